"""Folders unlike the training data (no tumour images, NIfTI slices, JPEG masks, spreadsheet manifests,
tiny or mask-free training sets): every command either works on them or says why, naming the file."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorlens.cli import main
from tumorlens.data.manifest import load_manifest, write_class_folder_manifest
from tumorlens.errors import InvalidInputError, ManifestError


def _strict_json(path: Path) -> dict:
    """The file parsed as JSON proper: ``NaN``/``Infinity`` (which Python writes by default) fail."""
    def refuse(c: str):
        raise ValueError(f"{path}: non-JSON constant {c}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _rows(dev_rows: list[dict], label: str, n: int, step: int = 53) -> list[dict]:
    """``n`` rows of one class spread over the dataset (so over several patient groups)."""
    return [r for r in dev_rows if r["label"] == label][::step][:n]


def _write_manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_text(text, encoding="utf-8")
    return folder


# ---- evaluate ------------------------------------------------------------------------------------

def test_evaluate_without_tumour_images_writes_null_not_nan(dev_rows, subset_factory, tmp_path, capsys):
    rows = _spread(dev_rows)[-2:] + _rows(dev_rows, "no_tumor", 1)  # no_tumor only, 2+ patient groups
    data = subset_factory(rows, "healthy")
    out = tmp_path / "m.json"
    assert main(["evaluate", str(data), "--json", str(out), "--no-margin"]) == 0, capsys.readouterr().err
    m = _strict_json(out)
    assert m["n"] == 3
    assert m["tumour_only_accuracy"] is None  # undefined without tumour images, not NaN and not a crash
    assert m["seg_dice"] is None and m["seg_n"] == 0
    assert m["ci95"]["groups"] == len({r["group"] for r in rows}) >= 2 and "tumour_only_accuracy" not in m["ci95"]
    assert m["ci95"]["accuracy"][0] <= m["accuracy"] <= m["ci95"]["accuracy"][1]
    assert "tumour-only -" in capsys.readouterr().out


def test_strict_json_writer_turns_every_non_finite_number_into_null(tmp_path):
    from tumorlens.evaluation.jsonio import dumps, write_json

    obj = {"a": float("nan"), "b": [1.0, np.float32("inf"), {"c": np.float64("-inf")}], "d": np.int64(3)}
    assert json.loads(dumps(obj)) == {"a": None, "b": [1.0, None, {"c": None}], "d": 3}
    assert _strict_json(write_json(obj, tmp_path / "x" / "o.json"))["a"] is None


def test_json_below_a_regular_file_fails_before_any_work(dev_rows, subset_factory, tmp_path, monkeypatch, capsys):
    import tumorlens.evaluation.evaluate as ev

    def never(*a, **k):
        raise AssertionError("evaluation ran although its output cannot be written")

    monkeypatch.setattr(ev, "evaluate_folder", never)
    data = subset_factory(_rows(dev_rows, "glioma", 1), "one")
    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", str(data), "--json", str(tmp_path / "afile" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "afile" in err and "not a folder" in err and "Traceback" not in err


def _nifti_slice(src: Path, dest: Path, mask: bool = False) -> None:
    """A 2D picture as a one-slice 3D image the way ITK / 3D Slicer store one (column i, row j at
    LPS (i, j, 0): the geometry ``tumorlens.data.readers`` gives JPEGs)."""
    import SimpleITK as sitk

    a = np.asarray(Image.open(src).convert("L"))
    a = (a > a.max() / 2).astype(np.uint8) if mask else a.astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(a[None]), str(dest))


def test_evaluate_nifti_slices_like_predict_and_like_the_jpegs(dev2d, tumour_rows, subset_factory, tmp_path,
                                                              predictor):
    from tumorlens.data.readers import read_image
    from tumorlens.evaluation.evaluate import evaluate_folder

    rows = tumour_rows[:4]
    jpeg = subset_factory(rows, "jpeg")
    nii = tmp_path / "nifti"
    (nii / "images").mkdir(parents=True)
    (nii / "masks").mkdir()
    lines = ["image,label,mask,group"]
    for i, r in enumerate(rows):
        _nifti_slice(dev2d / r["image"], nii / f"images/{i}.nii.gz")
        _nifti_slice(dev2d / r["mask"], nii / f"masks/{i}.nii.gz", mask=True)
        lines.append(f"images/{i}.nii.gz,{r['label']},masks/{i}.nii.gz,{r['group']}")
    _write_manifest(nii, "\n".join(lines) + "\n")

    mj = evaluate_folder(jpeg, progress=False)
    mn = evaluate_folder(nii, progress=False)
    labels = predictor.model.labels
    for i, r in enumerate(rows):
        one = predictor.predict(read_image(nii / f"images/{i}.nii.gz"))
        p = one.probabilities
        np.testing.assert_allclose(mn["_probs"][i], [p[c] for c in labels], atol=1e-5)  # evaluate == predict
        sims = predictor.predict(read_image(dev2d / r["image"])).extra["text_similarities"]
        assert one.extra["text_similarities"] == pytest.approx(sims, abs=2e-3)  # the same decision vector
    np.testing.assert_allclose(mn["_probs"], mj["_probs"], atol=2e-3)  # the same slice, the same answer
    # and the same text-space vector: a one-slice file's decision vector counts in the margin as the JPEG's
    assert mn["semantic_margin_n"] == mj["semantic_margin_n"] == 4
    assert mn["semantic_margin_rate"] == mj["semantic_margin_rate"]
    assert mn["seg_n"] == mj["seg_n"] == 4  # NIfTI masks (x, y, 1) are put on the image's grid
    assert mn["seg_dice"] == pytest.approx(mj["seg_dice"], abs=0.02) and mj["seg_dice"] > 0.5


def test_seg_dice_counts_tumour_images_only_and_constant_images_are_warned(dev2d, dev_rows, tumour_rows,
                                                                            subset_factory, tmp_path, caplog, capsys):
    from tumorlens.evaluation.evaluate import evaluate_folder

    healthy = _rows(dev_rows, "no_tumor", 2)
    data = subset_factory(tumour_rows[:2] + healthy, "mixed")
    # the first healthy image gets a mask that outlines something, the second an empty one
    ref = np.asarray(Image.open(dev2d / tumour_rows[0]["mask"]))
    Image.fromarray(ref).save(data / "masks" / "h0.png")
    Image.fromarray(np.zeros_like(ref)).save(data / "masks" / "h1.png")
    text = (data / "manifest.csv").read_text().splitlines()
    header = text[0].split(",")
    mi = header.index("mask")
    body = []
    for k, line in enumerate(text[1:]):
        cells = line.split(",")
        if k >= 2:
            cells[mi] = f"masks/h{k - 2}.png"
        body.append(",".join(cells))
    body.append(body[0])  # one image listed twice
    (data / "manifest.csv").write_text("\n".join([text[0], *body]) + "\n")
    with caplog.at_level(logging.WARNING):
        m = evaluate_folder(data, progress=False)
    assert m["n"] == 5 and m["seg_n"] == 3  # the two tumour images (one twice); no no_tumor mask counts
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "h0.png" in msgs and "ignored" in msgs and "h1.png" not in msgs
    assert "more than once" in msgs

    # an all-black image is scored as listed (one blank slice must not stop an evaluation), with a warning
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(data / "images" / "black.png")
    with open(data / "manifest.csv", "a") as f:
        f.write(",".join("images/black.png" if c == "image" else "no_tumor" if c == "label" else ""
                         for c in header) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m = evaluate_folder(data, progress=False)
    assert m["n"] == 6
    assert any("black.png" in r.getMessage() and "constant" in r.getMessage() for r in caplog.records)


# ---- masks ---------------------------------------------------------------------------------------

def test_jpeg_masks_are_not_inflated_by_compression_noise(dev2d, tumour_rows, tmp_path):
    from tumorlens.data.readers import read_mask

    src = dev2d / tumour_rows[1]["mask"]
    truth = read_mask(src)[0].numpy().astype(bool)
    assert truth.sum() > 100
    a = np.asarray(Image.open(src).convert("L"))
    Image.fromarray(a).save(tmp_path / "m.jpg", quality=75)
    Image.fromarray((a > 0).astype(np.uint8)).save(tmp_path / "m01.png")  # 0/1, as some tools save
    Image.fromarray(a > 0).save(tmp_path / "mbool.png")  # mode "1"
    jpg = read_mask(tmp_path / "m.jpg")[0].numpy().astype(bool)
    noisy = np.asarray(Image.open(tmp_path / "m.jpg")) > 0
    assert noisy.sum() > 1.1 * truth.sum()  # the noise this is about is there
    assert abs(int(jpg.sum()) - int(truth.sum())) < 0.05 * truth.sum()
    assert (jpg != truth).sum() < 0.05 * truth.sum()
    for name in ("m01.png", "mbool.png"):
        assert np.array_equal(read_mask(tmp_path / name)[0].numpy().astype(bool), truth), name


# ---- manifests and split -------------------------------------------------------------------------

def _spread(dev_rows: list[dict]) -> list[dict]:
    """8 images, 2 per class, each from its own patient group."""
    out = []
    for label in ("glioma", "meningioma", "pituitary", "no_tumor"):
        seen: set[str] = set()
        for r in dev_rows:
            if r["label"] == label and r["group"] not in seen:
                out.append(r)
                seen.add(r["group"])
            if len(seen) == 2:
                break
    return out


@pytest.mark.parametrize("sep,header", [(";", ("image", "label", "mask", "group")),
                                        ("\t", ("image", "label", "mask", "group")),
                                        (",", (" Image", "LABEL", " Mask", "Group"))])
def test_split_writes_a_loadable_folder_whatever_the_manifest_style(dev_rows, subset_factory, sep, header):
    from tumorlens.data.cli import write_split
    from tumorlens.data.manifest import load_manifest

    rows = _spread(dev_rows)
    data = subset_factory(rows, "src")
    lines = [sep.join(header)] + [sep.join((r["image"], r["label"], r["mask"], r["group"])) for r in rows]
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    n = 0
    for part in ("val", "train"):
        path, k, _aside = write_split(data, data.parent / part, part=part, val_fraction=0.25)
        m = load_manifest(path.parent)  # images and masks are where the manifest says
        assert len(m) == k > 0 and all(r.image.is_file() for r in m)
        assert sum(r.mask is not None for r in m) == sum(r.label != "no_tumor" for r in m)
        n += k
    assert n == len(rows)


def test_split_part_without_rows_is_a_typed_error(dev_rows, subset_factory, tmp_path):
    from tumorlens.data.cli import write_split

    data = subset_factory(_rows(dev_rows, "glioma", 1), "single")
    with pytest.raises(InvalidInputError, match="train part .* no images"):
        write_split(data, tmp_path / "train", part="train")
    assert not (tmp_path / "train").exists()


def test_duplicated_column_is_a_manifest_error(dev_rows, subset_factory):
    from tumorlens.data.manifest import load_manifest

    r = _rows(dev_rows, "glioma", 1)
    data = subset_factory(r, "dup")
    (data / "manifest.csv").write_text(f"image,label,LABEL\n{r[0]['image']},glioma,no_tumor\n")
    with pytest.raises(ManifestError, match="'label' appear more than once") as e:
        load_manifest(data)
    assert e.value.path.endswith("manifest.csv")


# ---- training ------------------------------------------------------------------------------------

def test_training_cache_tells_apart_folders_with_the_same_manifest(dev2d, dev_rows, subset_factory, tmp_path,
                                                                   monkeypatch):
    from tumorlens.data.dataset import load_arrays
    from tumorlens.data.manifest import load_manifest

    monkeypatch.setenv("TUMORLENS_CACHE", str(tmp_path / "cache"))
    a = subset_factory(_spread(dev_rows)[:4], "a")
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=False)
    for p in (b / "images").iterdir():  # the same names, other pixels (each image upside down)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(Image.open(p))[::-1].copy()).save(buf, format="JPEG", quality=95)
        p.write_bytes(buf.getvalue())
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    ia, _, _ = load_arrays(load_manifest(a), 32, progress=False)
    ib, _, _ = load_arrays(load_manifest(b), 32, progress=False)
    assert not np.array_equal(ia, ib)
    assert np.abs(ib.astype(int) - ia[:, ::-1].astype(int)).mean() < 8  # b holds b's own (flipped) pixels
    assert len(list((tmp_path / "cache").glob("arrays-*.npz"))) == 2


def test_train_on_a_small_folder_without_masks(dev_rows, subset_factory, tmp_path, monkeypatch):
    from tumorlens.training.train import train

    monkeypatch.setenv("TUMORLENS_CACHE", str(tmp_path / "cache"))
    rows = [dict(r, mask="") for r in _spread(dev_rows)]  # 8 images, none with a mask
    data = subset_factory(rows, "nomask")
    out = tmp_path / "model"
    cfg = {"data": {"root": str(data), "image_size": 32, "val_fraction": 0.25},  # 4 train images < batch 32
           "model": {"backbone": "resnet18"},
           "train": {"epochs": 1, "augment": False},
           "output": {"name": "tiny", "dir": str(out)}}
    res = train(cfg, progress=False)
    card = _strict_json(out / "model_card.json")
    assert card["data"]["n_train"] == 4 and card["metrics"]["best_epoch"] == 1
    assert card["metrics"]["validation"]["seg_dice"] is None
    assert res["card"]["history"][0]["val_seg_dice"] is None
    assert (out / "checkpoint.pt").is_file()


def test_a_folder_of_class_subfolders_gets_a_manifest_and_evaluates(dev2d, dev_rows, tmp_path, capsys,
                                                                    monkeypatch):
    """The Kaggle layout (one subfolder per class, spelt as Kaggle spells them, images nested, no manifest):
    `evaluate` names the fix, `tumorlens manifest` lists the folder once, then `evaluate` reads it. A second
    `manifest` replaces nothing; a subfolder that names no class is an error, not images left out."""
    data = tmp_path / "Testing"
    picked = {"glioma_tumor": _rows(dev_rows, "glioma", 2), "notumor": _rows(dev_rows, "no_tumor", 2),
              "pituitary": _rows(dev_rows, "pituitary", 2)}
    for folder, rows in picked.items():
        for i, r in enumerate(rows):
            dest = data / folder / ("nested" if i else "") / f"{folder}_{i}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(dev2d / r["image"], dest)
    assert main(["evaluate", str(data)]) == 2
    err = capsys.readouterr().err
    assert "glioma_tumor/, notumor/, pituitary/" in err and "tumorlens manifest" in err
    assert main(["manifest", str(data)]) == 0
    assert "6 images (glioma 2, pituitary 2, no_tumor 2)" in capsys.readouterr().out
    m = load_manifest(data)
    assert sorted(r.label for r in m.records) == ["glioma"] * 2 + ["no_tumor"] * 2 + ["pituitary"] * 2
    assert any("nested" in str(r.image) for r in m.records)
    before = (data / "manifest.csv").read_bytes()
    assert main(["manifest", str(data)]) == 2 and "already exists" in capsys.readouterr().err
    assert (data / "manifest.csv").read_bytes() == before
    out = tmp_path / "m.json"
    assert main(["evaluate", str(data), "--json", str(out)]) == 0
    metrics = _strict_json(out)
    assert metrics["n"] == 6 and sum(map(sum, metrics["confusion"]["matrix"])) == 6
    other = tmp_path / "Mixed"
    (other / "glioma").mkdir(parents=True)
    shutil.copy(dev2d / picked["glioma_tumor"][0]["image"], other / "glioma" / "a.jpg")
    (other / "unsorted").mkdir()
    with pytest.raises(ManifestError, match="unsorted name no class"):
        write_class_folder_manifest(other)
    assert not (other / "manifest.csv").exists()
    # a folder that cannot be written: the command names the file and the reason (no traceback)
    shutil.rmtree(other / "unsorted")
    import tumorlens.atomic

    def refuse(path, _text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tumorlens.atomic, "atomic_write_text", refuse)
    assert main(["manifest", str(other)]) == 2
    assert f"{other / 'manifest.csv'}: Permission denied" in capsys.readouterr().err


def test_a_one_slice_nifti_gets_the_jpegs_mask(dev2d, predictor, tmp_path):
    """An outside probe (session 37) found a slice stored as a one-slice NIfTI (as 3D Slicer sends a JPEG it
    opened) answered with another mask than the JPEG: the volume path skipped the lesion refiner where the seg
    head drew nothing above 0.5 (2167: 23 pixels against 154, pituitary 0.35 against 0.45 through the window
    classifier). It is decided as the 2D slice now."""
    from tumorlens.data.readers import read_image

    for idx in ("2167", "2166"):
        _nifti_slice(dev2d / "images" / f"{idx}.jpg", tmp_path / f"{idx}.nii.gz")
        jpeg = predictor.predict(read_image(dev2d / "images" / f"{idx}.jpg"))
        nii = predictor.predict(read_image(tmp_path / f"{idx}.nii.gz"))
        assert nii.label == jpeg.label
        assert nii.probabilities == pytest.approx(jpeg.probabilities, abs=2e-3), idx
        assert int(nii.mask.sum()) == int(jpeg.mask.sum()), idx
        assert not any("slice by slice" in c for c in nii.extra["caveats"])
    # and its saliency maps are the JPEG's (the volume path framed the slice another way: masks 0.97-0.995 alike)
    from tumorlens.saliency import explain

    a = explain(dev2d / "images" / "2167.jpg", method="gradcam", model=predictor.model, with_regions=False)
    b = explain(tmp_path / "2167.nii.gz", method="gradcam", model=predictor.model, with_regions=False)
    ha, hb = a.heatmap.numpy()[0], b.heatmap.numpy()[0][:, :, 0].T  # ITK stores column x row
    assert np.abs(ha - hb).max() < 1e-4 and np.array_equal(a.mask.numpy()[0], b.mask.numpy()[0][:, :, 0].T)


@pytest.mark.parametrize("how", ["columns toward the right", "rows toward the front", "transposed"])
def test_a_dicom_slice_stored_another_way_gets_the_same_answer(dev2d, predictor, tmp_path, how):
    """A single-frame DICOM went to the network as stored: the same anatomy stored with its columns toward the
    patient's right, its rows toward the front, or transposed was read as another image (slice 2167: pituitary 0.45
    stored the standard way, meningioma 0.72, glioma 0.53, glioma 0.88; an outside probe, session 37). It is read as
    a radiologist sees it now, and its mask comes back on its own grid."""
    from conftest import write_mr_slice

    from tumorlens.data.readers import read_image

    a = np.asarray(Image.open(dev2d / "images" / "2167.jpg").convert("L")).astype(np.uint16) * 4
    n, sp = a.shape[0], 0.9
    std = predictor.predict(read_image(write_mr_slice(a, tmp_path / "std.dcm", position=(0.0, 0.0, 40.0),
                                                      spacing=(sp, sp))))
    if how == "columns toward the right":  # the same voxels at the same places, stored mirrored
        stored, iop, ipp, undo = a[:, ::-1], (-1, 0, 0, 0, 1, 0), ((n - 1) * sp, 0.0, 40.0), lambda m: m[:, ::-1]
    elif how == "rows toward the front":
        stored, iop, ipp, undo = a[::-1], (1, 0, 0, 0, -1, 0), (0.0, (n - 1) * sp, 40.0), lambda m: m[::-1]
    else:
        stored, iop, ipp, undo = a.T, (0, 1, 0, 1, 0, 0), (0.0, 0.0, 40.0), lambda m: m.T
    other = predictor.predict(read_image(write_mr_slice(np.ascontiguousarray(stored), tmp_path / "other.dcm",
                                                        orientation=iop, position=ipp, spacing=(sp, sp))))
    assert other.label == std.label
    assert other.probabilities == pytest.approx(std.probabilities, abs=2e-3)
    assert np.array_equal(undo(other.mask.numpy()[0]), std.mask.numpy()[0])
    if how == "transposed":  # `tumorlens evaluate` reads such a slice as predict does
        from tumorlens.evaluation.evaluate import evaluate_folder

        (tmp_path / "images").mkdir()
        (tmp_path / "other.dcm").rename(tmp_path / "images" / "other.dcm")
        _write_manifest(tmp_path, "image,label,group\nimages/other.dcm,glioma,g1\n")
        m = evaluate_folder(tmp_path, progress=False)
        np.testing.assert_allclose(m["_probs"][0], [other.probabilities[c] for c in predictor.model.labels], atol=1e-5)
