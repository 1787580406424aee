"""HTTP errors of the app: bad input is a 4xx with a message naming the image, never a 500."""

from __future__ import annotations

import re

from fastapi import HTTPException

# an id names one file (or label folder) inside the datastore: anything a file name may hold - spaces,
# accents, brackets, as in 3D Slicer's node names ("3: T2 FLAIR") - but no path separator, no control
# character and no leading '.' or space (hidden files, '.', '..'; the app's own '.tumorlens' state)
ID_RE = re.compile(r"^[^./\\ \x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,159}$")


def bad_request(msg: str) -> HTTPException:
    return HTTPException(status_code=400, detail=msg)


def not_found(msg: str) -> HTTPException:
    return HTTPException(status_code=404, detail=msg)


def service_unavailable(msg: str) -> HTTPException:
    return HTTPException(status_code=503, detail=msg)


def storage_error(e: OSError, what: str) -> HTTPException:
    """A write the disk refused (full, read-only, no permission): what failed and why, not a bare 500.
    507 Insufficient Storage when the disk is full, else 503 (the server keeps serving reads)."""
    import errno

    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    why = "no space left on the studies disk" if full else f"the studies folder cannot be written ({e.strerror or e})"
    return HTTPException(status_code=507 if full else 503, detail=f"{what} not saved: {why}")


def conflict(msg: str) -> HTTPException:
    return HTTPException(status_code=409, detail=msg)


def check_id(value: str, what: str = "image id") -> str:
    """Ids name files inside the datastore: at most 160 characters, no path separators, control characters,
    or leading '.' / space."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise bad_request(f"invalid {what} {value!r}: at most 160 characters, no '/' or '\\', no control "
                          "characters, not starting with '.' or a space")
    return value
