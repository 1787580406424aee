"""``bench/stability.py``: how a grid's spread is summarised when cells are repeated over training seeds."""

from __future__ import annotations

import pytest
from conftest import bench_module


def _bench():
    return bench_module("stability")


def test_cells_are_seed_means_and_the_seed_spread_is_reported():
    rows = [{"backbone": "densenet121", "optimizer": "adamw", "lr": 1e-3, "seed": s, "accuracy": a}
            for s, a in ((0, 0.80), (1, 0.84), (2, 0.82))]
    rows.append({"backbone": "densenet121", "optimizer": "sgd", "lr": 1e-3, "seed": 0, "accuracy": 0.70})
    s = _bench().spreads(rows, aligned=False)["densenet121"]["plain"]
    assert s["best"] == pytest.approx(0.82) and s["worst"] == pytest.approx(0.70)
    assert s["spread"] == pytest.approx(0.12) and s["seed_spread"] == pytest.approx(0.04) and s["seeds"] == 3
    one = _bench().spreads(rows[3:], aligned=False)["densenet121"]["plain"]
    assert "seed_spread" not in one
