"""HTTP errors of the app: bad input is a 4xx with a message naming the image, never a 500."""

from __future__ import annotations

import re

from fastapi import HTTPException

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,159}$")


def bad_request(msg: str) -> HTTPException:
    return HTTPException(status_code=400, detail=msg)


def not_found(msg: str) -> HTTPException:
    return HTTPException(status_code=404, detail=msg)


def check_id(value: str, what: str = "image id") -> str:
    """Ids name files inside the datastore: letters, digits, ``._-`` only, no ``..``."""
    if not isinstance(value, str) or not ID_RE.match(value) or ".." in value:
        raise bad_request(f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (no path separators, no '..')")
    return value
