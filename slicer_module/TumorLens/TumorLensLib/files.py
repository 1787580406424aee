"""What a file on disk is, decided without Slicer."""

from __future__ import annotations


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
