"""Data: readers for JPEG/PNG/NIfTI/DICOM, one intensity normalisation, manifests and grouped splits."""

from tumorlens.data.manifest import Manifest, Record, load_manifest
from tumorlens.data.normalize import normalize_intensity
from tumorlens.data.readers import read_image, read_mask
from tumorlens.data.splits import grouped_split

__all__ = [
    "Manifest",
    "Record",
    "grouped_split",
    "load_manifest",
    "normalize_intensity",
    "read_image",
    "read_mask",
]
