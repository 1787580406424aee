"""Shared fixtures: real data from ../shared/data, the shipped model, temporary folders."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tumorlens.paths import project_root, shared_data_dir  # noqa: E402

ROOT = project_root()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "brain-mri-2d" / "manifest.csv").is_file():
        pytest.fail(f"real MRI expected at {d} (../shared/data beside the checkout)")
    return d


@pytest.fixture(scope="session")
def dev2d(shared_data) -> Path:
    return shared_data / "brain-mri-2d"


@pytest.fixture(scope="session")
def brats(shared_data) -> Path:
    return shared_data / "brats-3d"


@pytest.fixture(scope="session")
def dev_rows(dev2d) -> list[dict]:
    with open(dev2d / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def tumour_rows(dev_rows) -> list[dict]:
    """A fixed, spread-out sample of tumour images with masks (every 97th)."""
    rows = [r for r in dev_rows if r["mask"]]
    return rows[::97]


@pytest.fixture(scope="session")
def model():
    from tumorlens.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def predictor(model):
    from tumorlens.inference import Predictor

    return Predictor(model)


def bench_module(name: str):
    """A ``bench/NAME.py`` script imported as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_subset(src: Path, rows: list[dict], dest: Path) -> Path:
    """A manifest folder whose files are symlinks to the real ones (nothing copied)."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(parents=True, exist_ok=True)
    for r in rows:
        for col in ("image", "mask"):
            if r.get(col):
                link = dest / r[col]
                if not link.exists():
                    link.symlink_to(src / r[col])
    with open(dest / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return dest


@pytest.fixture
def subset_factory(dev2d, tmp_path):
    def _make(rows: list[dict], name: str = "subset") -> Path:
        return make_subset(dev2d, rows, tmp_path / name)

    return _make


def write_mr_slice(arr, path: Path, orientation=(1, 0, 0, 0, 1, 0), position=(-64.0, -64.0, 10.0),
                   spacing=(0.5, 0.5)) -> Path:
    """A single-frame MR DICOM (no patient identifiers) from a 2D array [rows, columns], with its Image
    Orientation / Position (Patient) as given (LPS, DICOM's own frame)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 5.0
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(arr).astype(np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    pydicom.dcmwrite(str(path), ds, write_like_original=False)
    return Path(path)


def _dicom_series(vol, folder, spacing=(0.9, 0.9, 3.0), series_uid="1.2.826.0.1.3680043.2.1125.1.1", prefix="slice",
                  modality="MR"):
    """A real multi-file DICOM series (one slice per file) written by SimpleITK/GDCM."""
    import numpy as np
    import SimpleITK as sitk

    folder.mkdir(exist_ok=True)
    img = sitk.GetImageFromArray(vol.astype(np.int16))  # (z, y, x)
    img.SetSpacing(spacing)
    img.SetOrigin((-100.0, -120.0, 30.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(vol.shape[0]):
        s = img[:, :, z]
        s.SetMetaData("0008|0060", modality)
        s.SetMetaData("0020|000e", series_uid)
        s.SetMetaData("0020|0013", str(z + 1))
        s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        s.SetMetaData("0008|0018", f"{series_uid}.{z + 1}")
        writer.SetFileName(str(folder / f"{prefix}{z:03d}.dcm"))
        writer.Execute(s)
    return folder


@pytest.fixture(scope="session")
def write_dicom_series():
    """``(vol [z, y, x], folder, spacing=...) -> folder``: a real DICOM series written by SimpleITK/GDCM."""
    return _dicom_series


def wait_until_answering(url: str, proc, log: Path, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``proc`` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}): {Path(log).read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer in {timeout_s:.0f} s: {Path(log).read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
