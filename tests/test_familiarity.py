"""Familiarity (k-NN similarity to the training images, and the layer statistics of the encoder's stages):
calibration, the flag on real non-brain and other-scanner images with the shipped model, and how it reaches the
findings record, the report and the Slicer panel."""

from __future__ import annotations

import numpy as np
import pytest

from tumorlens.alignment.familiarity import Familiarity, calibrate, knn_similarity, unfamiliar
from tumorlens.alignment.layer_statistics import LayerStatistics
from tumorlens.alignment.layer_statistics import fit as fit_layer_statistics
from tumorlens.alignment.tip_adapter import TipAdapter
from tumorlens.data import read_image
from tumorlens.errors import InvalidInputError
from tumorlens.paths import project_root


def _cache(n: int = 200, d: int = 16, seed: int = 0) -> tuple[TipAdapter, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)).astype(np.float32)
    return TipAdapter(keys, rng.integers(0, 4, n), 4), keys


def test_knn_similarity_is_the_kth_nearest_cosine_and_calibration_its_quantile():
    cache, keys = _cache()
    assert np.allclose(knn_similarity(cache, keys[:10], k=1), 1.0, atol=1e-5)  # every key is its own nearest
    s2 = knn_similarity(cache, keys[:10], k=2)
    assert (s2 < 1.0 - 1e-4).all()  # the 2nd nearest is another key
    rng = np.random.default_rng(1)
    val = rng.normal(size=(300, 16)).astype(np.float32)
    cal = calibrate(cache, val, k=5, quantile=0.05)
    s = knn_similarity(cache, val, 5)
    assert cal["threshold"] == pytest.approx(np.quantile(s, 0.05))
    assert 0.03 <= (s < cal["threshold"]).mean() <= 0.07


def test_familiarity_record_is_consistent():
    f = Familiarity(0.80004, 0.86, 5)
    assert not f.familiar and f.as_dict() == {"score": 0.8, "threshold": 0.86, "k": 5, "familiar": False}
    assert Familiarity(0.86, 0.86, 5).familiar
    # the per-image flag and the dataset rule agree at the recorded precision, also at the edge
    assert Familiarity(0.86352, 0.86348, 5).familiar and not unfamiliar(0.86352, 0.86348)
    assert list(unfamiliar([0.5, 0.86349, 0.9], 0.8635)) == [True, False, False]


def _pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"pydicom's bundled {name} is missing: pydicom must stay < 3 (pyproject)"
    return path


@pytest.fixture(scope="module")
def head_ct():
    return _pydicom_file("693_J2KI.dcm")  # a real axial head CT slice (JPEG 2000) inside the pydicom<3 wheel


def test_shipped_model_flags_a_head_ct_but_not_a_bundled_brain_mri(predictor, head_ct):
    assert predictor.familiarity_calibration is not None, "the shipped alignment head carries no familiarity calibration"
    pred = predictor.predict(read_image(head_ct))
    ct = pred.extra["familiarity"]
    assert ct["familiar"] is False and ct["score"] < ct["threshold"]
    assert any("modality is CT" in c for c in pred.extra["caveats"])
    mri = predictor.predict(read_image(project_root() / "samples/studies/mri2d_0102.jpg"))
    assert mri.extra["familiarity"]["familiar"] is True and mri.extra["familiarity"]["score"] > ct["score"] + 0.1
    assert mri.extra["caveats"] == []


def test_a_ct_the_familiarity_score_misses_still_carries_the_modality_caveat(predictor):
    """A skull-base CT slice looks familiar to the network (measured 0.97 against 0.86) and is called glioma
    with p 0.97; the header's Modality is what says the result means little. A DICOM SEG (pydicom's
    liver_1frame.dcm, a binary liver mask) is not an image at all."""
    pred = predictor.predict(read_image(_pydicom_file("J2K_pixelrep_mismatch.dcm")))
    assert any("modality is CT" in c for c in pred.extra["caveats"])
    with pytest.raises(InvalidInputError, match="SEG object"):
        read_image(_pydicom_file("liver_1frame.dcm"))


def test_unfamiliar_image_reaches_findings_and_report(predictor, head_ct):
    from tumorlens.findings import Findings, build_findings
    from tumorlens.report.facts import build_facts

    img = read_image(head_ct)
    pred = predictor.predict(img)
    f = build_findings(img, pred.probabilities, masks=[("segmentation_head", pred.mask.numpy()[0])],
                       model=predictor.model, familiarity=pred.extra["familiarity"])
    assert f.classification.familiarity is not None and not f.classification.familiarity.familiar
    assert f.notes and f.notes[0].startswith("image is unlike the training images")
    again = Findings.from_dict(f.model_dump(mode="json"))  # round trip through JSON
    assert again.classification.familiarity == f.classification.familiarity
    facts = build_facts(f)
    assert facts.unfamiliar and any("unlike the images the model was trained on" in x for x in facts.limitations())
    bad = f.model_dump(mode="json")
    bad["classification"]["familiarity"]["familiar"] = True  # contradicts score < threshold
    with pytest.raises(InvalidInputError, match="familiar"):
        Findings.from_dict(bad)


def test_flair_volumes_are_flagged_and_score_below_t1c(predictor, brats):
    """The model was trained on contrast-enhanced T1 slices. BraTS FLAIR volumes (a sequence it never saw,
    which it calls meningioma with p up to 0.94) fall below the threshold (measured 0.84 and 0.78 against
    0.86); the same patients' T1c volumes score higher (0.865, 0.92: both just or well above it). Volume score: median over brain slices."""
    for pat in sorted(p for p in brats.iterdir() if p.is_dir()):
        flair = predictor.predict(read_image(next(pat.glob("Flair*.nii*")))).extra["familiarity"]
        t1c = predictor.predict(read_image(next(pat.glob("T1c*.nii*")))).extra["familiarity"]
        assert set(flair) == {"score", "threshold", "k", "familiar", "layer_score", "layer_threshold"}
        assert flair["familiar"] is False, (pat.name, flair)
        assert t1c["score"] > flair["score"] + 0.02, (pat.name, t1c, flair)
        assert t1c["layer_score"] < flair["layer_score"], (pat.name, t1c, flair)  # 2.9-3.3 against 4.3-4.8


def test_a_colour_photograph_is_called_out_as_not_mri_and_the_report_leads_with_it(predictor, dev2d, dev_rows, tmp_path):
    """A photograph of a cat was read as pituitary tumour (p 0.97) with no caveat: the k-NN familiarity
    calls it familiar (0.81 against 0.785). The reader's colour share says what the grey network cannot;
    the same MRI slice saved as an RGB JPEG gets no such caveat."""
    import skimage.data
    from PIL import Image

    from tumorlens.caveats import IN_COLOUR
    from tumorlens.findings.build import build_findings
    from tumorlens.report.facts import build_facts

    cat = tmp_path / "cat.jpg"
    Image.fromarray(skimage.data.chelsea()).save(cat, quality=90)
    img = read_image(cat)
    pred = predictor.predict(img)
    notes = [c for c in pred.caveats if IN_COLOUR in c]
    assert len(notes) == 1 and "photograph" in notes[0], pred.caveats
    findings = build_findings(img, pred.probabilities, masks=[("segmentation_head", pred.mask.numpy()[0])],
                              notes=pred.extra["caveats"], familiarity=pred.extra.get("familiarity"))
    caution = build_facts(findings).scope_caution()
    assert caution is not None and "in colour" in caution and "may not apply" in caution, caution
    # the same photograph as 3D Slicer sends a colour JPEG it loaded (a one-slice NIfTI of RGB24 voxels)
    import nibabel as nib

    xy = np.transpose(np.asarray(skimage.data.chelsea()), (1, 0, 2))[:, :, None]
    rgb24 = np.empty(xy.shape[:3], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for i, c in enumerate("RGB"):
        rgb24[c] = xy[..., i]
    nib.save(nib.Nifti1Image(rgb24, np.eye(4)), str(tmp_path / "cat.nii.gz"))
    assert any(IN_COLOUR in c for c in predictor.predict(read_image(tmp_path / "cat.nii.gz")).caveats)
    row = next(r for r in dev_rows if r["label"] == "glioma")
    grey = np.asarray(Image.open(dev2d / row["image"]).convert("L"))
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(tmp_path / "slice_rgb.jpg", quality=95)
    plain = predictor.predict(read_image(tmp_path / "slice_rgb.jpg"))
    assert not any(IN_COLOUR in c for c in plain.caveats), plain.caveats
    assert plain.label == predictor.predict(read_image(dev2d / row["image"])).label


def test_a_grey_texture_is_called_out_as_not_framed_like_mri_and_a_tight_crop_of_a_head_is_not(predictor, dev2d,
                                                                                                tmp_path):
    """scikit-image's moon (grey, filling its frame) was read as pituitary tumour (p 0.99) and passed as familiar
    (0.90 against 0.785) with no caveat. Its frame has no dark air around a head: the prediction says so and the
    report's impression leads with it. A real slice cropped tight to the head (its head fills 97 % of its box,
    which the slice placement used to call 'not a head-shaped object', a scope caution on a real MRI) gets
    neither."""
    import skimage.data
    from PIL import Image

    from tumorlens.caveats import NO_DARK_BORDER
    from tumorlens.findings.build import build_findings
    from tumorlens.report.facts import build_facts
    from tumorlens.saliency.explain import explain

    moon = tmp_path / "moon.png"
    Image.fromarray(skimage.data.moon()).save(moon)
    img = read_image(moon)
    pred = predictor.predict(img)
    notes = [c for c in pred.caveats if NO_DARK_BORDER in c]
    assert len(notes) == 1 and pred.extra["dark_border_fraction"] < 0.05, pred.caveats
    findings = build_findings(img, pred.probabilities, masks=[("segmentation_head", pred.mask.numpy()[0])],
                              notes=pred.extra["caveats"], familiarity=pred.extra.get("familiarity"))
    caution = build_facts(findings).scope_caution()
    assert caution is not None and "dark surroundings" in caution and "may not apply" in caution, caution
    tight = dev2d / "images" / "1477.jpg"
    pred = predictor.predict(read_image(tight))
    assert not any(NO_DARK_BORDER in c for c in pred.caveats) and pred.extra["dark_border_fraction"] > 0.5
    record = explain(tight, method="gradcam", model=predictor.model).findings.model_dump()
    assert any("bounding box" in n for n in record["notes"]), record["notes"]  # placement still lowers confidence
    assert build_facts(record).out_of_scope() == [], record["notes"]


def test_layer_statistics_flag_a_shifted_sample_and_about_one_in_a_hundred_like_validation(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 1200)
    centres = [rng.normal(size=(4, d)) * 3 for d in (8, 24)]
    mix = [rng.normal(size=(d, d)) * 0.3 + np.eye(d) for d in (8, 24)]  # correlated features

    def draw(labels, shift=0.0):
        return [c[labels] + rng.normal(size=(len(labels), m.shape[0])) @ m + shift for c, m in zip(centres, mix, strict=True)]

    stats = fit_layer_statistics(draw(y), y, draw(rng.integers(0, 4, 2000)), components=6)
    fresh = stats.scores(draw(rng.integers(0, 4, 3000)))
    assert 0.004 <= (fresh > stats.threshold).mean() <= 0.03
    shifted = stats.scores([draw(y[:200])[0], draw(y[:200], shift=4.0)[1]])  # one stage moved off, the other not
    assert (shifted > stats.threshold).mean() > 0.9
    stats.meta["checkpoint_sha"] = "x"
    back = LayerStatistics.load(stats.save(tmp_path / "layer_statistics.pt"))
    sample = draw(y[:5])
    assert back.threshold == stats.threshold and np.allclose(back.scores(sample), stats.scores(sample))


def test_familiar_needs_both_measures_and_the_record_refuses_a_contradiction():
    from pydantic import ValidationError

    from tumorlens.caveats import familiarity_note
    from tumorlens.findings.schema import FamiliarityInfo

    f = Familiarity(0.95, 0.79, 5, 4.2, 3.6)
    assert not f.familiar and f.as_dict()["layer_score"] == 4.2
    note = familiarity_note(f.as_dict())
    assert "layer score 4.200 above the threshold 3.600" in note and "below the threshold" not in note
    assert Familiarity(0.95, 0.79, 5, 3.6, 3.6).familiar and Familiarity(0.95, 0.79, 5).familiar
    FamiliarityInfo(**Familiarity(0.95, 0.79, 5, 4.2, 3.6).as_dict())
    with pytest.raises(ValidationError):
        FamiliarityInfo(score=0.95, threshold=0.79, k=5, familiar=True, layer_score=4.2, layer_threshold=3.6)
    with pytest.raises(ValidationError):
        FamiliarityInfo(score=0.95, threshold=0.79, k=5, familiar=True, layer_score=1.0)


def _abdomen_slice(path) -> None:
    """A synthetic axial abdomen cross-section (body, liver, spleen, kidneys, spine, bowel gas) as an 8-bit PNG."""
    from PIL import Image

    yy, xx = np.mgrid[:480, :480].astype(np.float32)
    img = np.full((480, 480), -1000.0, np.float32)

    def ellipse(cx, cy, rx, ry):
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1

    img[ellipse(240, 250, 215, 160)] = 45  # soft tissue
    img[ellipse(240, 250, 205, 150) & ~ellipse(240, 250, 190, 138)] = -90  # subcutaneous fat
    img[ellipse(165, 215, 85, 65)] = 65  # liver
    img[ellipse(330, 195, 38, 28)] = 55  # spleen
    img[ellipse(185, 310, 24, 34) | ellipse(300, 310, 24, 34)] = 160  # kidneys (enhancing)
    img[ellipse(240, 335, 26, 24)] = 650  # vertebral body
    img[ellipse(270, 200, 22, 15) | ellipse(215, 175, 15, 11)] = -700  # bowel gas
    img += np.random.default_rng(7).normal(0, 12, img.shape).astype(np.float32)
    Image.fromarray(np.clip((img + 160) / 400 * 255, 0, 255).astype(np.uint8)).save(path)


def test_an_abdomen_cross_section_is_flagged_by_the_layer_statistics(predictor, dev_rows, dev2d, tmp_path):
    """A synthetic abdomen slice had been read as meningioma 0.98, familiar by the k-NN score (0.82 against 0.79),
    with no caution at all; a CT slice saved as PNG as no tumour 0.98. The encoder's stage statistics set it apart,
    the record says which measure did, the template report leads with it and still verifies, and real slices of
    the development set stay familiar."""
    from tumorlens.findings.build import build_findings
    from tumorlens.report import generate_report

    assert predictor.layer_statistics is not None, "the shipped model carries no layer statistics: tumorlens familiarity"
    path = tmp_path / "abdomen.png"
    _abdomen_slice(path)
    img = read_image(path)
    pred = predictor.predict(img)
    fam = pred.extra["familiarity"]
    assert fam["layer_score"] > fam["layer_threshold"] and not fam["familiar"], fam
    assert any("layer score" in c for c in pred.caveats), pred.caveats
    findings = build_findings(img, pred.probabilities, masks=[("segmentation_head", pred.mask.numpy()[0])],
                              notes=pred.extra["caveats"], familiarity=fam)
    out = generate_report(findings, backend="template")
    assert out.verification["supported"], out.verification
    assert "unlike the images the model was trained on" in " ".join(out.report.limitations + [out.report.impression])
    scores = [predictor.predict(read_image(dev2d / r["image"])).extra["familiarity"] for r in dev_rows[::173]]
    assert sum(s["layer_score"] <= s["layer_threshold"] for s in scores) >= len(scores) - 1, scores


def test_a_file_that_says_it_is_not_of_the_head_is_called_out(predictor, dev2d, dev_rows, tmp_path):
    """A DICOM of Body Part Examined ABDOMEN holding an abdominal MR slice was read as meningioma 0.98 with no caution,
    its "lesion" 179 x 112 mm (an outside probe, session 40). The recorded body part, and a foreground wider than any
    head when the pixel spacing is known, now lead the report's impression; a head slice gets neither."""
    import pydicom
    from conftest import write_mr_slice
    from PIL import Image

    from tumorlens.caveats import NOT_THE_HEAD
    from tumorlens.findings.build import build_findings
    from tumorlens.report.facts import build_facts

    grey = np.asarray(Image.open(dev2d / dev_rows[0]["image"]).convert("L"), dtype=np.float32) * 8

    def notes(name, part=None, spacing=(0.45, 0.45)):
        path = write_mr_slice(grey, tmp_path / f"{name}.dcm", spacing=spacing)
        if part is not None:
            ds = pydicom.dcmread(str(path))
            ds.BodyPartExamined = part
            ds.save_as(str(path))
        img = read_image(path)
        pred = predictor.predict(img)
        return img, pred, [c for c in pred.caveats if c.startswith(NOT_THE_HEAD)]

    assert notes("head", "HEAD")[2] == [] and notes("plain")[2] == []
    img, pred, said = notes("abdomen", "ABDOMEN")
    assert len(said) == 1 and "ABDOMEN" in said[0], pred.caveats
    findings = build_findings(img, pred.probabilities, masks=[("segmentation_head", pred.mask.numpy()[0])],
                              notes=pred.extra["caveats"], familiarity=pred.extra.get("familiarity"))
    caution = build_facts(findings).scope_caution()
    assert caution and "not of the head (it records the body part ABDOMEN)" in caution and "may not apply" in caution
    _, pred, said = notes("wide", spacing=(1.5, 1.5))  # the same head (212 pixels across) at 1.5 mm: 318 mm
    assert len(said) == 1 and "wider than any head" in said[0], pred.caveats


@pytest.mark.parametrize("part,caution", [
    ("ABDOMEN", True), ("KNEE", True), ("C-SPINE", True), ("Chest", True),
    # head words, placeholders and parts not listed raise nothing (real brain MRI had been cautioned; session 40)
    ("HEAD", False), ("BRAINSTEM", False), ("CEREBELLUM", False), ("HYPOPHYSIS", False), ("MRA HEAD", False),
    ("Brain MRI", False), ("HEAD^NECK", False), ("UNKNOWN", False), ("OTHER", False), ("-", False), ("", False),
])
def test_only_a_body_part_that_is_not_the_head_raises_the_caution(part, caution):
    from tumorlens.caveats import body_part_note

    assert bool(body_part_note(part)) is caution


def test_a_slice_whose_foreground_fills_the_frame_is_not_judged_by_its_width():
    """Real slices at a 290-300 mm field of view whose head (or noisy background) touches both edges had been
    called wider than a head: the width measured was the frame's."""
    from tumorlens.inference import slice_width_mm

    meta = {"spacing_known": True, "spacing": (1.2, 1.2)}
    frame = np.zeros((256, 256), np.float32)
    frame[:, 20:236] = 100.0  # touches the top and bottom edges: 307 mm tall, but that is the frame's height
    assert slice_width_mm(frame, meta) is None
    body = np.zeros((256, 256), np.float32)
    body[40:216, 8:248] = 100.0  # a wide body inside the frame: 288 mm across
    assert slice_width_mm(body, meta) == pytest.approx(288.0)
