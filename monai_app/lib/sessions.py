"""MONAI Label's session store with safe archive unpacking and expiry that holds between sweeps.

``PUT /session/?uncompress=true`` hands the upload to ``shutil.unpack_archive`` as it is: a tar
member named ``../../x`` or ``/x`` is written outside the session store (any client could replace
datastore files or model versions that way), and a file that is not an archive fails with a 500.
Here the archive's members are checked first (relative paths inside it, plain files and folders
only), tar files are unpacked with the ``data`` filter as a second guard, and anything else is a 400.
MONAI Label also removes expired sessions only on its periodic sweep, so an expired id kept working
for minutes; here it is gone as soon as it is asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from monailabel.utils.sessions import Sessions

from lib.datastore import content_hint, file_ext, in_temp_folder
from lib.errors import bad_request

logger = logging.getLogger(__name__)


def _unsafe(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def check_archive(path: str, label: str) -> None:
    """A 400 unless ``path`` is a zip or tar archive whose members stay inside the folder it is
    unpacked into and are plain files or folders (no links, devices or absolute names)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            bad = [i.filename for i in z.infolist() if _unsafe(i.filename)]
            # a symlink in a zip is a member whose Unix mode says so
            bad += [i.filename for i in z.infolist() if (i.external_attr >> 16) & 0o170000 == 0o120000]
    else:
        try:
            with tarfile.open(path) as t:
                members = t.getmembers()
        except (tarfile.TarError, OSError) as e:
            raise bad_request(f"session upload {label}: uncompress=true needs a zip or tar archive "
                              f"({type(e).__name__}: {e})") from e
        bad = [m.name for m in members if _unsafe(m.name) or not (m.isfile() or m.isdir())]
    if bad:
        raise bad_request(f"session upload {label}: the archive has members that would land outside the "
                          f"session or are not plain files: {', '.join(bad[:5])}")


def public_name(path: str) -> str:
    """An upload's file name as answers may show it: ``image`` plus its suffixes when the name looks like it
    names the patient (a session upload ``Smith_John_19580214.zip`` came back in answers and errors)."""
    from tumorlens.findings.identifiers import safe_file_name

    return safe_file_name(os.path.basename(str(path).rstrip("/")))


def _unpack(data_file: str, folder: str) -> None:
    """Check and unpack the archive ``data_file`` into ``folder``; a 400 for anything unusable."""
    name = public_name(data_file)
    check_archive(data_file, name)
    try:
        shutil.unpack_archive(data_file, folder, **({} if zipfile.is_zipfile(data_file) else {"filter": "data"}))
    except Exception as e:
        raise bad_request(f"session upload {name}: cannot unpack: {e}") from e
    if not any(os.scandir(folder)):
        raise bad_request(f"session upload {name}: the archive is empty")


def _drop_upload(data_file: str) -> None:
    """The folder MONAI Label received a refused upload into (a fresh one in the temporary folder)."""
    folder = os.path.dirname(os.path.abspath(data_file))
    if in_temp_folder(folder):
        shutil.rmtree(folder, ignore_errors=True)


# what archivers and DICOM media add beside the images: macOS resource forks and folder settings, the
# DICOMDIR index of a CD/PACS export (the series files it lists sit in the folders beside it)
IGNORED = {"__MACOSX", ".DS_Store", "DICOMDIR", "Thumbs.db", "desktop.ini"}


def _content(folder: str) -> str:
    """What an unpacked archive holds: its one file (a zipped NIfTI), else the innermost folder that
    is not a lone wrapper folder (``series/`` around a DICOM series), so the readers find the image."""
    while True:
        entries = [e for e in os.scandir(folder) if e.name not in IGNORED]
        if len(entries) != 1:
            return folder
        if entries[0].is_file():
            return entries[0].path
        folder = entries[0].path


def neutral_name(path: str) -> str:
    """``path`` renamed in its folder to ``public_name`` when its name looks like it names the patient: MONAI
    Label keeps a session's file under its own name and sends that path back in the session's info."""
    safe = public_name(path)
    if safe == os.path.basename(str(path).rstrip("/")):
        return path
    target = os.path.join(os.path.dirname(str(path).rstrip("/")), safe)
    if os.path.exists(target):
        return path
    os.replace(path, target)
    return target


class TumorlensSessions(Sessions):
    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        data_file = neutral_name(data_file)
        if not uncompress or os.path.isdir(data_file):
            return self._readable(data_file, *super().add_session(data_file, expiry, False, session_id))
        folder = tempfile.mkdtemp(prefix="tumorlens-session-")
        try:
            _unpack(data_file, folder)
            content = neutral_name(_content(folder))
            return self._readable(data_file, *super().add_session(content, expiry, False, session_id))
        except Exception:
            _drop_upload(data_file)  # MONAI Label removes it only after a successful add
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _readable(self, data_file: str, session_id: str, info):
        """A session must hold an image the readers can open: a file that is not one (a text file, a
        truncated volume) was accepted and failed only at the first inference. Refused here with the
        readers' reason, and nothing is kept."""
        from tumorlens.data.readers import read_image
        from tumorlens.errors import InvalidInputError

        try:
            read_image(info.image)
        except InvalidInputError as e:
            self.remove_session(session_id)
            _drop_upload(data_file)
            name = public_name(data_file)
            hint = content_hint(info.image, file_ext(name)) if os.path.isfile(info.image) else ""
            problem = e.problem
            for p in sorted({str(info.image), str(Path(info.image).resolve()), str(e.path or "")} - {""}, key=len,
                            reverse=True):  # the server's session folder is no business of the client's
                problem = problem.replace(p, name)
            raise bad_request(f"session upload {name}: {problem}{hint}") from e
        return session_id, info

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        info = super().get_session(session_id, update_ts=False, fetch_cache=fetch_cache)
        if info and info.expiry > 0 and info.last_access_ts + info.expiry < int(time.time()):
            logger.info(f"session {session_id} expired; removing it")
            self.remove_session(session_id)
            return None
        if info and update_ts:
            info.last_access_ts = int(time.time())
            self._write_meta_info(session_id, info)
        return info

    def remove_expired(self) -> int:
        """The periodic sweep (MONAI Label's reads the expiry of a session it has just removed)."""
        if not os.path.isdir(self.store_path):
            return 0
        count = 0
        for entry in os.scandir(self.store_path):
            if entry.is_dir() and self.get_session(entry.name, update_ts=False, fetch_cache=False) is None:
                self.remove_session(entry.name)  # expired, dangling or without meta information
                count += 1
        return count
