"""The slice-view classifier that 2D placement uses to pick the plane (tumorlens.atlas.view)."""

from __future__ import annotations

import numpy as np
import pytest

from tumorlens.atlas.view import PLANES, ViewClassifier, shipped_view_classifier, train_view_classifier
from tumorlens.errors import InvalidInputError


@pytest.fixture(scope="module")
def val_view_rows(dev2d, dev_rows) -> dict[str, list[dict]]:
    """Dev rows of the grouped validation part (the shipped classifier never saw them), by view."""
    from tumorlens.data.manifest import load_manifest
    from tumorlens.data.splits import training_split

    _, val_idx = training_split(load_manifest(dev2d), 0.2, 0)
    val = [dev_rows[i] for i in val_idx]
    return {v: [r for r in val if r["view"] == v] for v in PLANES}


def _spread(rows: list[dict], n: int) -> list[dict]:
    return rows[:: max(1, len(rows) // n)][:n]


def test_shipped_classifier_names_the_plane_of_validation_slices(dev2d, val_view_rows):
    from tumorlens.atlas.placement import head_of_slice
    from tumorlens.atlas.view import predict_view
    from tumorlens.data import read_image

    clf = shipped_view_classifier()
    assert clf is not None, "models/slice-view is missing"
    assert clf.card["metrics"]["val_accuracy"] > 0.9
    right = 0
    for view, rows in val_view_rows.items():
        for r in _spread(rows, 4):
            x, head, _ = head_of_slice(read_image(dev2d / r["image"]).numpy()[0])
            p = predict_view(x, head, clf)
            assert abs(sum(p.values()) - 1) < 1e-5
            right += max(p, key=p.get) == view
    # validation accuracy 0.969 over 488 slices (models/slice-view/card.json)
    assert right >= 10, right


def test_placement_searches_the_classified_plane(dev2d, val_view_rows):
    from tumorlens.atlas.placement import place_slice
    from tumorlens.data import read_image

    planes, truth = [], []
    for view, rows in val_view_rows.items():
        for r in _spread(rows, 2):
            pl = place_slice(read_image(dev2d / r["image"]))
            planes.append(pl.plane)
            truth.append(view)
            assert pl.view_probabilities is not None and 0.0 <= pl.confidence <= pl.view_probabilities[pl.plane]
            assert pl.summary()["view_probabilities"]
    # with the classifier 0.99 of 90 validation slices land in the right plane, template matching alone 0.40
    assert sum(p == t for p, t in zip(planes, truth, strict=True)) >= 5, (planes, truth)
    alone = place_slice(read_image(dev2d / val_view_rows["axial"][0]["image"]), use_view=False)
    assert alone.view_probabilities is None and alone.plane in PLANES


def test_train_view_on_a_small_real_subset_and_reload(dev_rows, subset_factory, tmp_path):
    rows = [r for v in PLANES for r in _spread([r for r in dev_rows if r["view"] == v], 30)]
    data = subset_factory(rows, "views")
    clf, m = train_view_classifier(data, progress=False)
    assert m["n_train"] + m["n_val"] == len(rows) and m["n_val"] > 0
    assert 0.0 <= m["val_accuracy"] <= 1.0 and str(m["alpha"]) in m["cv_accuracy_by_alpha"]
    back = ViewClassifier.load(clf.save(tmp_path / "sv"))
    f = np.random.default_rng(0).normal(size=(2, back.mean.shape[0])).astype(np.float32)
    np.testing.assert_allclose(back.probabilities(f), clf.probabilities(f), rtol=1e-6)
    assert back.card["data"]["split"] == "grouped"


def test_train_view_bad_inputs(dev_rows, subset_factory, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "view"} for r in dev_rows[:12]]
    with pytest.raises(InvalidInputError, match="view"):
        train_view_classifier(subset_factory(rows, "noview"), progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "view_classifier.npz").write_bytes(b"not an npz")
    (bad / "card.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="view_classifier.npz"):
        ViewClassifier.load(bad)
