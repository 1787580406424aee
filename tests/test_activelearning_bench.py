"""``bench/activelearning.py``: whether the strategies rank the images the model misreads first."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest
from conftest import bench_module


def _bench():
    return bench_module("activelearning")


def test_auroc_is_the_share_of_error_pairs_ranked_first_with_ties_as_half():
    b = _bench()
    rng = np.random.default_rng(3)
    score = rng.integers(0, 5, 40).astype(float)  # many ties
    wrong = rng.random(40) < 0.3
    pairs = [1.0 if p > q else 0.5 if p == q else 0.0
             for p, q in product(score[wrong], score[~wrong])]
    assert b.auroc(score, wrong) == pytest.approx(np.mean(pairs))
    assert b.auroc(np.arange(6.0), np.array([0, 0, 0, 1, 1, 1], bool)) == 1.0
    assert b.auroc(-np.arange(6.0), np.array([0, 0, 0, 1, 1, 1], bool)) == 0.0
    assert np.isnan(b.auroc(np.arange(3.0), np.zeros(3, bool)))
    assert b.errors_in_top(np.array([0.9, 0.1, 0.8, 0.2]), np.array([1, 1, 0, 0], bool), 2) == 1


def test_the_bench_scores_a_real_folder(dev_rows, subset_factory, tmp_path):
    """On real slices: every strategy is scored, the picks are counted, and the picture is written."""
    rows = [r for r in dev_rows if r["label"] == "glioma"][:4] + [r for r in dev_rows if r["label"] == "no_tumor"][:4]
    folder = subset_factory(rows)
    out, png = tmp_path / "al.json", tmp_path / "al.png"
    assert _bench().main([str(folder), "--k", "2,4", "--json", str(out), "--png", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 8 and set(res["strategies"]) == {"uncertainty", "saliency_disagreement", "random"}
    for s in res["strategies"].values():
        assert len(s["curve"]) == 8 and s["curve"][-1] == res["errors"]
        assert sum(s["top"]["4"]["by_true_class"].values()) == 4
    assert png.stat().st_size > 10_000
