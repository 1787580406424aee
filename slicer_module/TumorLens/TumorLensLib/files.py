"""What a file on disk is, decided without Slicer."""

from __future__ import annotations

import gzip
import os
import re

PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def is_picture_file(path: str | None) -> bool:
    """A picture (JPEG, PNG, BMP, TIFF): Slicer gives it 1 mm pixels and ignores its EXIF orientation, so the
    file itself, not the volume Slicer made of it, is what the server should read."""
    return bool(path) and path.lower().endswith(PICTURE_EXTENSIONS) and os.path.isfile(path)


def is_dicom_file(path: str) -> bool:
    """A DICOM part-10 file ("DICM" after the 128-byte preamble) or one named ``.dcm``: it stands for its
    series when Slicer reads it, while a picture or NRRD next to numbered ones stands for itself."""
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_modality(path: str | None) -> str | None:
    """The Modality tag (0008,0060) of a DICOM file, when pydicom (shipped with Slicer) can read it."""
    if not path or not is_dicom_file(path):
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # noqa: BLE001 - no pydicom, or a file it cannot read: the modality stays unknown
        return None
    modality = str(getattr(ds, "Modality", "") or "").strip().upper()
    return modality if re.fullmatch(r"[A-Z]{2,8}", modality) else None


NIFTI1_HEADER_SIZE = 348
DESCRIP = slice(148, 228)  # the NIfTI-1 header's 80-byte description


def stamp_nifti_modality(path: str, modality: str) -> bool:
    """Write ``tumorlens modality=<modality>`` into a NIfTI-1 file's description, where the server's reader looks
    for it: a DICOM series goes up as the NIfTI the scene writes, which has no modality field, so an MR series
    was read as "modality assumed", or as CT from its intensities (an outside probe, session 39). False when the
    file is no NIfTI-1."""
    with open(path, "rb") as f:
        raw = f.read()
    packed = path.endswith(".gz")
    data = gzip.decompress(raw) if packed else raw
    if len(data) < NIFTI1_HEADER_SIZE or int.from_bytes(data[:4], "little") != NIFTI1_HEADER_SIZE:
        return False
    text = f"tumorlens modality={modality}".encode("ascii")[:80].ljust(80, b"\0")
    data = data[:DESCRIP.start] + text + data[DESCRIP.stop:]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(data) if packed else data)
    os.replace(tmp, path)
    return True
