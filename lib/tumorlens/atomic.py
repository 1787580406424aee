"""Writing result files: atomically (a reader never sees half a file), readable like any file the user
writes (``mkstemp`` makes 0600 files: a report or mask shared through a folder was unreadable to
the rest of the group), and with a typed error naming the folder when it cannot be made."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tumorlens.errors import InvalidInputError

FILE_MODE = 0o644


def ensure_dir(folder: str | Path) -> Path:
    """``folder``, created if needed; an existing file or an unwritable place is an InvalidInputError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(folder, "output folder is an existing file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(folder, f"cannot create the output folder: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK):
        raise InvalidInputError(folder, "output folder is not writable")
    return folder


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` (same folder; the name keeps ``path``'s suffixes, e.g. ``.nii.gz``),
    then rename onto ``path``."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text (UTF-8) written atomically, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def file_version(path: str | Path) -> tuple:
    """(resolved path, mtime ns, size): changes when a file is rewritten, the key of the loaders' caches."""
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_mtime_ns, st.st_size
