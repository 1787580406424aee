"""What a file on disk is, decided without Slicer."""

from __future__ import annotations

import os

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
