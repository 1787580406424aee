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
