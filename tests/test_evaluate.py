"""`tumorlens evaluate` with the shipped model on 64 real images of its own grouped validation split."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tumorlens.data import grouped_split, load_manifest
from tumorlens.labels import CLASS_NAMES
from tumorlens.models import load_model

# The shipped model's grouped-validation accuracy is in its model card (≈ 0.9 or more). On 64 images the
# binomial standard deviation at p = 0.9 is ≈ 0.0375, so 0.75 is four deviations below: a working model
# passes, while a broken pipeline (chance is 0.25, one-class is ≤ 0.35 here) cannot.
ACCURACY_FLOOR = 0.75
DICE_FLOOR = 0.5


@pytest.fixture(scope="module")
def val64(dev2d, dev_rows):
    m = load_manifest(dev2d)
    _, val = grouped_split(m, 0.2, seed=0)  # the split the shipped model was validated on
    step = len(val) // 64
    return [dev_rows[i] for i in val[::step][:64]]


def test_shipped_model_is_the_default_and_documented():
    lm = load_model()
    card = lm.card
    assert lm.name == "tumorlens-densenet121" and lm.backbone == "densenet121"
    assert card["data"]["split"]["method"].startswith("grouped")
    v = card["metrics"]["validation"]
    assert v["accuracy"] > ACCURACY_FLOOR + 0.1 and v["seg_dice"] > DICE_FLOOR
    assert (lm.path / "checkpoint.pt").stat().st_size < 40 * 2**20


def test_evaluate_cli_on_64_validation_images(val64, subset_factory, tmp_path):
    data = subset_factory(val64, "val64")
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "tumorlens.cli", "evaluate", str(data), "--json", str(out)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(out.read_text())
    for key in ("n", "accuracy", "tumour_only_accuracy", "balanced_accuracy", "per_class", "confusion", "ece",
                "seg_dice", "model"):
        assert key in m, key
    assert m["n"] == 64 and set(m["model"]) >= {"name", "version"}
    assert set(m["per_class"]["glioma"]) == {"precision", "recall", "f1", "n"}
    assert sum(map(sum, m["confusion"]["matrix"])) == 64
    assert m["accuracy"] >= ACCURACY_FLOOR and m["tumour_only_accuracy"] >= ACCURACY_FLOOR
    assert m["seg_dice"] >= DICE_FLOOR
    # validation images are what the familiarity threshold was set on (1 % below it): few are flagged
    fam = m["familiarity"]
    assert fam["k"] >= 1 and 0.5 < fam["threshold"] < fam["median"] <= 1.0
    assert fam["unfamiliar_fraction"] <= 0.1 and fam["accuracy_familiar"] >= ACCURACY_FLOOR
    border = m["dark_border"]  # MRI slices: a head in dark air, none below the caveat's floor
    assert border["n_pictures"] == 64 and border["n_below"] == 0 and border["min"] >= 0.5
    w = m["window_classifier"]  # the lesion-window classifier's share in the decisions
    assert m["model"]["window_classifier"] is True and 0 <= w["changed_and_right"] <= w["labels_changed"] < 64 // 4
    gain = m["accuracy"] - w["accuracy_network_alone"]  # each changed type is one image more or less right
    assert gain == pytest.approx((2 * w["changed_and_right"] - w["labels_changed"]) / 64)
    lo, hi = w["gain_ci95"]["accuracy_gain"]
    assert lo <= gain <= hi and "lesion-window classifier" in proc.stdout
    assert (tmp_path / "metrics.confusion.png").stat().st_size > 5000
    assert "accuracy" in proc.stdout
    ci = m["ci95"]  # resampled over the subset's patient groups, each interval around its point estimate
    assert ci["groups"] == len({r["group"] for r in val64}) and ci["level"] == 0.95
    for key in ("accuracy", "tumour_only_accuracy", "seg_dice"):
        assert ci[key][0] <= m[key] <= ci[key][1], key
    assert "95 % interval" in proc.stdout
    # the semantic margin of the vector each decision is the nearest prototype of: a positive margin is a
    # decision the text agrees with, so the rate follows accuracy; the aligned head's alone follows its own
    assert m["semantic_margin_n"] == 64 and m["semantic_margin_rate"] >= ACCURACY_FLOOR
    assert abs(m["semantic_margin_rate"] - m["accuracy"]) <= 2 / 64
    assert abs(m["semantic_margin_rate_network"] - w["accuracy_network_alone"]) <= 2 / 64
    assert "semantic margin rate" in proc.stdout


def test_margin_rates_count_rows_with_similarities_only():
    from tumorlens.evaluation.evaluate import margin_rates

    sims = np.array([[0.9, 0.1, 0.2, 0.3], [0.2, 0.5, 0.4, 0.1], [0.3, 0.2, 0.1, 0.0], [np.nan] * 4])
    labels = np.array([0, 2, 0, 1])
    right = np.eye(4)[[0, 2, 0, 1]]
    right[3] = np.nan
    r = margin_rates(sims, right, labels)
    assert r["semantic_margin_rate"] == pytest.approx(2 / 3) and r["semantic_margin_n"] == 3
    assert r["semantic_margin_rate_network"] == 1.0
    assert margin_rates(np.full((2, 4), np.nan), np.full((2, 4), np.nan), labels[:2])["semantic_margin_rate"] is None


def test_grouped_bootstrap_widens_with_correlated_errors():
    """Errors clustered in a few patients: the group-level interval is wider than one that treats every
    image as independent; a perfect classifier gets a zero-width interval."""

    from tumorlens.evaluation.metrics import grouped_bootstrap
    from tumorlens.labels import CLASS_NAMES

    labels = np.zeros(200, int)
    groups = np.repeat(np.arange(20), 10)
    probs = np.zeros((200, len(CLASS_NAMES)))
    probs[:, 0] = 1.0
    assert grouped_bootstrap(labels, probs, CLASS_NAMES, groups)["accuracy"] == [1.0, 1.0]
    probs[groups < 3] = np.roll(probs[groups < 3], 1, axis=1)  # three patients entirely wrong: accuracy 0.85
    grouped = grouped_bootstrap(labels, probs, CLASS_NAMES, groups)["accuracy"]
    images = grouped_bootstrap(labels, probs, CLASS_NAMES, np.arange(200))["accuracy"]
    assert grouped[0] < 0.85 < grouped[1] and images[0] < 0.85 < images[1]
    assert grouped[1] - grouped[0] > 1.5 * (images[1] - images[0])
    dice = np.where(np.arange(200) % 2 == 0, 0.7, np.nan)
    assert grouped_bootstrap(labels, probs, CLASS_NAMES, groups, dice)["seg_dice"] == [0.7, 0.7]
    # paired: the same images under a better decision; the gain's interval comes from the same draws
    better = probs.copy()
    better[groups == 0] = np.eye(len(CLASS_NAMES))[0]  # one of the three wrong patients put right: +0.05
    paired = grouped_bootstrap(labels, better, CLASS_NAMES, groups, baseline=probs)
    assert 0 <= paired["accuracy_gain"][0] < 0.05 < paired["accuracy_gain"][1]
    assert grouped_bootstrap(labels, probs, CLASS_NAMES, groups, baseline=probs)["accuracy_gain"] == [0.0, 0.0]


def test_evaluate_names_the_bad_manifest(tmp_path):
    (tmp_path / "manifest.csv").write_text("image,label\nimages/x.jpg,glioma\n")
    proc = subprocess.run([sys.executable, "-m", "tumorlens.cli", "evaluate", str(tmp_path)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 2
    assert "x.jpg" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_cli_flags_unfamiliar_and_volumes_and_skips_bad_files(dev2d, tumour_rows, tmp_path, capsys):
    """``tumorlens predict`` carries the same warnings as the findings record: the familiarity of each
    image, the caveat every volume prediction has; a file it cannot read is reported, the rest run."""
    import nibabel as nib

    from tumorlens.cli import main
    from tumorlens.inference import VOLUME_CAVEAT
    from tumorlens.paths import sample_studies_dir

    good = dev2d / tumour_rows[0]["image"]
    zeros = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.eye(4)), zeros)
    rng = np.random.default_rng(0)  # a block of noise: nothing like an MRI slice
    noise = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((128, 128, 1)).astype(np.float32), np.eye(4)), noise)
    vol = sample_studies_dir() / "brats_t1c_0001.nii.gz"
    import SimpleITK as sitk
    from PIL import Image

    ct = sitk.GetImageFromArray(np.asarray(Image.open(good).convert("L"), dtype=np.int16))
    ct.SetMetaData("0008|0060", "CT")  # the same slice, said to be a CT by its header
    sitk.WriteImage(ct, str(tmp_path / "ct.dcm"))
    out = tmp_path / "p.json"
    code = main(["predict", str(good), str(zeros), str(noise), str(vol), str(tmp_path / "ct.dcm"), "--json", str(out)])
    assert code == 1  # one file failed, the others were classified
    recs = json.loads(out.read_text())
    assert [r["file"] for r in recs] == [good.name, "zeros.nii.gz", "noise.nii.gz", vol.name, "ct.dcm"]
    assert any("modality is CT" in c for c in recs[4]["caveats"])
    assert "constant" in recs[1]["error"] and "label" not in recs[1]
    assert recs[0]["familiarity"]["familiar"] and recs[0]["caveats"] == []
    # which model answered, named as the findings record names it (a probe found predict named none)
    from tumorlens.models.registry import load_model

    shipped = load_model()
    assert recs[0]["model"] == {"name": shipped.name, "version": shipped.version}
    # the fields the server's answers carry too (the README placed them "in the prediction")
    assert set(recs[0]["text_similarities"]) == set(CLASS_NAMES) and recs[0]["dark_border_fraction"] > 0.5
    assert not recs[2]["familiarity"]["familiar"] and "unlike the training images" in recs[2]["caveats"][0]
    assert VOLUME_CAVEAT in recs[3]["caveats"]
    assert 0.85 < recs[3]["head_template_dice"] <= 1.0 and "head_template_dice" not in recs[0]
    printed = capsys.readouterr()
    assert "UNFAMILIAR" in printed.out and "zeros.nii.gz" in printed.err


def test_a_volume_on_a_tilted_grid_says_so(predictor):
    """Routine axials are angled 5-20 degrees; the 2D network reads the stored slices, and a probe's glioma tilted
    5 degrees came back a meningioma. Such a volume's answer says how far its grid is tilted; an axis-aligned one
    (and the same grid merely flipped, as LPS storage is) does not get the caveat."""
    from tumorlens.data import read_image
    from tumorlens.inference import TILT_CAVEAT_DEGREES, grid_tilt_degrees, grid_turn_degrees
    from tumorlens.paths import sample_studies_dir

    vol = read_image(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    assert grid_tilt_degrees(vol.affine) < 0.01
    assert grid_tilt_degrees(np.diag([-2.0, -2.0, 2.0, 1.0])) < 0.01
    t = np.radians(10.0)
    rot = np.array([[1, 0, 0, 0], [0, np.cos(t), -np.sin(t), 0], [0, np.sin(t), np.cos(t), 0], [0, 0, 0, 1]])
    tilted = vol.clone()
    tilted.affine = torch.as_tensor(rot @ vol.affine.numpy(), dtype=vol.affine.dtype)
    assert abs(grid_tilt_degrees(tilted.affine) - 10.0) < 0.01
    said = [c for c in predictor.predict(tilted).extra["caveats"] if "tilted" in c]
    assert said and "10 degrees" in said[0] and TILT_CAVEAT_DEGREES < 10
    # a 10 degree tilt with a 20 degree turn within the plane was "tilted 22 degrees" (session 39 probe): the tilt
    # and the turn are told apart
    z = np.radians(20.0)
    turn = np.array([[np.cos(z), -np.sin(z), 0, 0], [np.sin(z), np.cos(z), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    both = rot @ turn @ vol.affine.numpy()
    assert abs(grid_tilt_degrees(both) - 10.0) < 0.01 and abs(grid_turn_degrees(both) - 20.0) < 1.5
    assert grid_turn_degrees(vol.affine) < 0.01 and grid_turn_degrees(tilted.affine) < 0.5


def test_an_outline_under_a_no_tumour_call_comes_with_a_caveat(dev2d, predictor):
    """The seg head outlines 137 pixels of this tumour-free slice, which the classifier calls no tumour
    (p = 0.97): `predict` and the server's answers gave the outline with no word, while `explain` left it
    empty. Every answer now says the outline is unconfirmed."""
    from tumorlens.data import read_image

    p = predictor.predict(read_image(dev2d / "images" / "3130.jpg"))
    assert p.label == "no_tumor" and p.mask.sum() > 0
    assert any("although the classifier predicts no tumour" in c for c in p.caveats), p.caveats


def test_a_padded_slice_is_reframed_and_its_mask_lands_on_the_head(dev2d, tumour_rows, predictor):
    """A slice exported with a wide border (the head fills a third of the frame) is classified like
    the slice itself, and its seg mask comes back on the padded grid where the head is; a slice framed
    like the training slices is left as it is."""

    from tumorlens.data import read_image
    from tumorlens.evaluation.metrics import dice_score
    from tumorlens.inference import head_frame, prepare_slice

    row = next(r for r in tumour_rows if r["label"] == "pituitary")
    img = read_image(dev2d / row["image"])
    arr = img.numpy()[0]
    assert head_frame(arr) is None  # a training-like frame: untouched
    h, w = arr.shape
    padded = np.zeros((3 * h, 3 * w), np.float32)
    padded[h:2 * h, w:2 * w] = arr
    assert head_frame(padded) is not None
    x0, x1 = prepare_slice(arr, 128), prepare_slice(padded, 128)
    assert float(np.corrcoef(x0.numpy().ravel(), x1.numpy().ravel())[0, 1]) > 0.8  # unframed: a small head, ~0.2
    from monai.data import MetaTensor

    p0 = predictor.predict(img)
    p1 = predictor.predict(MetaTensor(padded[None], meta=dict(img.meta)))
    assert p1.label == p0.label
    m0, m1 = p0.mask.numpy()[0] > 0, p1.mask.numpy()[0] > 0
    assert m1.shape == padded.shape and not m1[:h].any() and not m1[2 * h:].any()
    assert dice_score(m1[h:2 * h, w:2 * w], m0) > 0.7


def test_a_picture_far_from_square_is_framed_not_squashed(dev2d, tumour_rows, predictor):
    """A slice centred in a 2:1 picture (a screenshot or viewer export) was resized to the network's square,
    the head squashed to half its width: a meningioma came back a glioma with an empty mask. It is framed
    like a padded slice now; a slice stored with rectangular pixels (the head stretched with its frame) is
    still resized, which makes it round again."""
    from monai.data import MetaTensor

    from tumorlens.data import read_image
    from tumorlens.evaluation.metrics import dice_score
    from tumorlens.inference import head_frame

    for label in ("meningioma", "pituitary"):
        row = next(r for r in tumour_rows if r["label"] == label)
        img = read_image(dev2d / row["image"])
        arr = img.numpy()[0]
        h, w = arr.shape
        p0 = predictor.predict(img)
        assert p0.label == label
        m0 = p0.mask.numpy()[0] > 0
        wide = np.zeros((h, 2 * w), np.float32)
        wide[:, w // 2:w // 2 + w] = arr
        tall = np.zeros((2 * h, w), np.float32)
        tall[h // 2:h // 2 + h] = arr
        for padded, inner in ((wide, (slice(None), slice(w // 2, w // 2 + w))),
                              (tall, (slice(h // 2, h // 2 + h), slice(None)))):
            assert head_frame(padded) is not None
            p1 = predictor.predict(MetaTensor(padded[None], meta=dict(img.meta)))
            assert p1.label == label
            m1 = p1.mask.numpy()[0] > 0
            assert m1.shape == padded.shape and dice_score(m1[inner], m0) > 0.7
        stretched = np.repeat(arr, 2, axis=0)  # rows at half the pixel size: the head stretched with its frame
        assert head_frame(stretched) is None


def test_a_jpeg_turned_by_its_exif_tag_is_read_as_viewers_show_it(dev2d, tumour_rows, predictor, tmp_path):
    """Phones and exporters store pixels turned and say so in the EXIF Orientation tag; every viewer shows
    the picture upright. The tag was ignored: an upright pituitary slice stored turned came back a meningioma,
    and a mirrored one had its tumour on the wrong side. The upright picture is analysed now, and its affine
    keeps every pixel where the stored grid has it (a mask lands on the stored file in 3D Slicer)."""
    from PIL import Image

    from tumorlens.data import read_image
    from tumorlens.data.readers import PHOTO_AFFINE, reorient_like

    row = next(r for r in tumour_rows if r["label"] == "pituitary")
    up = Image.open(dev2d / row["image"]).convert("L")
    base = predictor.predict(read_image(dev2d / row["image"]))
    stored_as = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 2: Image.Transpose.FLIP_LEFT_RIGHT,
                 5: Image.Transpose.TRANSPOSE}
    for tag, turn in stored_as.items():
        path = tmp_path / f"exif{tag}.jpg"
        exif = Image.Exif()
        exif[0x0112] = tag
        stored = up.transpose(turn)
        stored.save(path, quality=95, exif=exif.tobytes())
        img = read_image(path)
        assert img.meta["exif_orientation"] == tag and img.shape[1:] == (up.height, up.width)
        assert np.abs(img.numpy()[0] - np.asarray(up, np.float32)).mean() < 3  # the upright picture (JPEG noise)
        p = predictor.predict(img)
        assert p.label == base.label
        on_stored, _ = reorient_like(p.mask.numpy()[0][..., None], np.asarray(img.affine, float), PHOTO_AFFINE)
        want = np.asarray(Image.fromarray(base.mask.numpy()[0].astype(np.uint8) * 255).transpose(turn)) > 0
        assert on_stored.shape[:2] == want.shape
        inter = np.logical_and(on_stored[..., 0] > 0, want).sum()
        assert 2 * inter / max(1, (on_stored > 0).sum() + want.sum()) > 0.8


def test_tiny_pictures_strips_and_huge_intensities(dev2d, tumour_rows, predictor, tmp_path):
    """A 24 px thumbnail's lesion is the seg head's, not the refiner's (which blew a few pixels up to half the
    picture); a 1-pixel strip is no slice (one command classified it, another refused it); a slice stored at
    1e35 keeps its mask (float32 statistics overflowed and emptied it)."""
    from PIL import Image

    from tumorlens.data import read_image
    from tumorlens.errors import InvalidInputError
    from tumorlens.models.refiner import normalise_crop

    row = next(r for r in tumour_rows if r["label"] == "glioma")
    src = Image.open(dev2d / row["image"]).convert("L")
    src.resize((24, 24), Image.LANCZOS).save(tmp_path / "thumb.png")
    p = predictor.predict(read_image(tmp_path / "thumb.png"))
    truth = np.asarray(Image.open(dev2d / row["mask"]).resize((24, 24), Image.NEAREST)) > 0
    assert (p.mask.numpy()[0] > 0).sum() <= 3 * max(truth.sum(), 10)
    Image.fromarray(np.asarray(src)[128:129, :]).save(tmp_path / "strip.png")
    with pytest.raises(InvalidInputError, match="no head slice"):
        read_image(tmp_path / "strip.png")
    x = np.asarray(src, np.float32)
    assert np.allclose(normalise_crop(x * np.float32(1e35)), normalise_crop(x), atol=1e-3)
    assert np.allclose(normalise_crop(x / np.float32(1e30)), normalise_crop(x), atol=1e-3)


def test_evaluate_says_how_many_pictures_are_not_framed_like_an_mri_slice(dev2d, val64, tmp_path):
    """A dataset of crops inside the head (or of pictures that are not MRI) is scored as asked, and the summary
    says how many of its pictures get the dark-border caveat and how the model did on them."""
    from PIL import Image

    from tumorlens.evaluation.evaluate import evaluate_folder, format_table

    folder = tmp_path / "crops"
    (folder / "images").mkdir(parents=True)
    lines = ["image,label,group"]
    for k, row in enumerate(val64[:6]):
        a = np.asarray(Image.open(dev2d / row["image"]).convert("L"))
        rows, cols = np.flatnonzero((a > 30).any(1)), np.flatnonzero((a > 30).any(0))  # the head's box
        r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
        inside = a[(3 * r0 + r1) // 4:(r0 + 3 * r1) // 4, (3 * c0 + c1) // 4:(c0 + 3 * c1) // 4]  # its middle half
        name = f"images/{k}.png" if k < 4 else f"images/{k}_whole.png"
        Image.fromarray(inside if k < 4 else a).save(folder / name)
        lines.append(f"{name},{row['label']},{row['group']}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    m = evaluate_folder(folder, progress=False)
    b = m["dark_border"]
    assert b["n_pictures"] == 6 and b["n_below"] == 4 and b["below_fraction"] == pytest.approx(4 / 6)
    assert b["accuracy_below"] is not None and b["accuracy_rest"] is not None
    assert "not framed like an MRI slice" in format_table(m)
