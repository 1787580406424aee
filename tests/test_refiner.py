"""Lesion refiner: crop/paste geometry, the shipped refiner on real validation slices, training on
real outlines, and the CLI's checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tumorlens.data import grouped_split, load_manifest, read_image, read_mask
from tumorlens.evaluation.metrics import dice_score
from tumorlens.inference import Predictor, tumour_mask
from tumorlens.models.refiner import (
    REFINER_FILE,
    LesionRefiner,
    build_refiner_net,
    carry_refiner,
    crop_grid,
    lesion_box,
    lesion_window,
    paste,
    sample,
)


def test_crop_then_paste_gives_back_the_window():
    """A window cut from a non-square image and pasted back lands where it came from."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:180, 0:240].astype(np.float32)
    img = np.sin(yy / 9) + np.cos(xx / 13) + 0.01 * rng.standard_normal((180, 240)).astype(np.float32)
    cy, cx, w = 70.0, 150.0, 64.0
    c = sample(img, crop_grid(img.shape, cy, cx, w, out=128))  # 2x oversampled: the round trip is smooth
    back, inside = paste(c, img.shape, cy, cx, w)
    rows, cols = np.where(inside)
    assert rows.min() == pytest.approx(cy - w / 2, abs=1) and cols.max() == pytest.approx(cx + w / 2, abs=1)
    err = np.abs(back - img)[inside]
    assert np.median(err) < 0.05 and np.quantile(err, 0.9) < 0.15


def test_lesion_box_takes_the_largest_part_and_window_has_a_floor():
    m = np.zeros((100, 100), bool)
    m[10:14, 10:14] = True  # a speck
    m[50:80, 40:60] = True  # the lesion: 30 rows x 20 cols
    cy, cx, side = lesion_box(m)
    assert (cy, cx, side) == (64.5, 49.5, 30.0)
    assert lesion_box(np.zeros((5, 5), bool)) is None
    assert lesion_window(2) == 48.0 and lesion_window(100) == pytest.approx(184.0)


def test_refine_leaves_a_map_without_lesion_alone():
    r = LesionRefiner(net=build_refiner_net().eval())
    arr = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    prob = np.full((64, 64), 0.2, np.float32)
    assert r.refine(arr, prob, np.zeros((64, 64), bool)) is prob


@pytest.fixture(scope="module")
def val_tumours(dev2d):
    """Every 6th tumour slice with an outline in the shipped model's grouped validation part (325 since session 36)."""
    m = load_manifest(dev2d)
    _, val = grouped_split(m, 0.2, seed=0)
    recs = [m.records[i] for i in val if m.records[i].mask is not None]
    return recs[::6]


def test_shipped_refiner_raises_dice_on_validation_slices(model, val_tumours):
    """The stored refiner is used by default and, on held-out slices, outlines tumours better than the
    seg head alone (the full validation figures are in the model card's ``refiner`` entry)."""
    assert (model.path / REFINER_FILE).is_file()
    card = json.loads((model.path / "model_card.json").read_text())["refiner"]
    assert card["validation"]["seg_dice_refined"] > card["validation"]["seg_dice_head"]
    # without the window classifier, whose window follows the mask: the class is then the network's alone
    with_r, without = Predictor(model, window=False), Predictor(model, refine=False, window=False)
    assert with_r.refiner is not None and without.refiner is None
    d_with, d_without, changed_outside = [], [], 0
    for rec in val_tumours:
        img = read_image(rec.image)
        truth = read_mask(rec.mask, like=img)[0].numpy() > 0
        a, b = with_r.predict(img), without.predict(img)
        assert a.probabilities == b.probabilities  # the class is the classifier's alone
        ma, mb = a.mask[0].numpy() > 0, b.mask[0].numpy() > 0
        d_with.append(dice_score(ma, truth))
        d_without.append(dice_score(mb, truth))
        box = lesion_box(tumour_mask(b.seg_prob[0].numpy(), b.label != "no_tumor"))
        if box is not None:  # outside the window around the seg head's lesion the map is the head's
            win = paste(np.ones((8, 8), np.float32), ma.shape, box[0], box[1], lesion_window(box[2]))[1]
            changed_outside += int((a.seg_prob[0].numpy() != b.seg_prob[0].numpy())[~win].sum())
    assert len(d_with) >= 50
    assert np.mean(d_with) > np.mean(d_without) + 0.01
    assert changed_outside == 0


def test_train_refiner_learns_from_real_outlines(tmp_path, dev2d, model):
    """A few epochs on real outlines lower the loss; --no-save leaves the model folder as it was."""
    from tumorlens.training.refiner import train_refiner

    folder = model.path
    before = (folder / REFINER_FILE).stat().st_mtime
    rec = train_refiner(data_dir=dev2d, epochs=6, max_images=48, save=False, json_out=tmp_path / "r.json",
                        progress=False)
    losses = [h["loss"] for h in rec["training"]["history"]]
    assert losses[-1] < losses[0]
    assert rec["stored"] is False and rec["validation"]["n"] > 0
    assert (folder / REFINER_FILE).stat().st_mtime == before
    assert json.loads((tmp_path / "r.json").read_text())["data"]["same_manifest_as_model"] is True


def test_carry_refiner(tmp_path, model):
    assert carry_refiner(model.path, tmp_path) is True
    assert (tmp_path / REFINER_FILE).read_bytes() == (model.path / REFINER_FILE).read_bytes()
    assert carry_refiner(tmp_path / "nothing", tmp_path / "x") is False


def test_train_refiner_cli_checks_before_work(tmp_path):
    def cli(*a):
        return subprocess.run([sys.executable, "-m", "tumorlens.cli", "train-refiner", *a], capture_output=True,
                              text=True, timeout=120)

    r = cli("--epochs", "0")
    assert r.returncode != 0 and "at least 1" in r.stderr
    r = cli("--json", str(tmp_path), "--no-save")
    assert r.returncode != 0 and "folder" in r.stderr and "Traceback" not in r.stderr
