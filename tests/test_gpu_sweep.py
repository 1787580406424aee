"""``bench/gpu_sweep.py``: the arrays that travel to a GPU machine are the ones training reads here."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bench_module

from tumorlens.data.dataset import load_arrays
from tumorlens.data.manifest import load_manifest


def _sweep():
    return bench_module("gpu_sweep")


def test_packed_arrays_come_back_bit_for_bit_where_training_reads_them(subset_factory, dev_rows, tmp_path,
                                                                        monkeypatch):
    """pack → stage: on the far side the stand-in folder has the real manifest (same hash, same grouped
    split) and ``load_arrays`` finds exactly the pixels, masks and labels it builds from the real files."""
    monkeypatch.setenv("TUMORLENS_CACHE", str(tmp_path / "cache"))
    sweep = _sweep()
    rows = dev_rows[::60][:40]
    data = subset_factory(rows)
    images, masks, labels = load_arrays(load_manifest(data), 48, progress=False)
    assert masks.any() and len(set(labels.tolist())) > 1
    sweep.pack(data, 48, tmp_path / "packed")
    assert not list((tmp_path / "packed").glob("*.jpg"))  # pixels travel only as the lossless arrays
    monkeypatch.setenv("TUMORLENS_CACHE", str(tmp_path / "far-cache"))
    far = tmp_path / "far" / "brain-mri-2d"
    sweep.stage(tmp_path / "packed", far, 48)
    staged = load_manifest(far)
    assert staged.sha256 == load_manifest(data).sha256
    assert all((far / r["image"]).stat().st_size == 0 for r in rows)  # stand-ins, no pixels
    i2, m2, l2 = load_arrays(staged, 48, progress=False)
    assert np.array_equal(i2, images) and np.array_equal(m2, masks) and np.array_equal(l2, labels)
    with pytest.raises(SystemExit, match="already holds a manifest"):  # never over a real image folder
        sweep.stage(tmp_path / "packed", data, 48)


def test_a_sweep_refuses_configs_the_packed_arrays_cannot_serve(tmp_path):
    """Every run reads the one staged folder at the packed size; a config asking for another size (or
    another folder) would meet empty stand-in files, so the sweep stops before staging anything."""
    sweep = _sweep()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data: {root: ../shared/data/brain-mri-2d, image_size: 128}\noutput: {dir: runs/models/a}\n")
    b.write_text("data: {root: ../shared/data/brain-mri-2d, image_size: 192}\noutput: {dir: runs/models/b}\n")
    with pytest.raises(SystemExit, match="one data.root at data.image_size 128"):
        sweep.run([a, b], tmp_path / "packed", 128, 1.0, tmp_path / "out", 0)
    with pytest.raises(SystemExit, match="image_size 64"):
        sweep.run([a], tmp_path / "packed", 64, 1.0, tmp_path / "out", 0)
    assert not (tmp_path / "out").exists()
