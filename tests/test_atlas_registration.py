"""Registration to MNI152: a lesion planted in a known structure of a different brain (nilearn's
ICBM152 2009), moved off MNI space by a known transform, must come back in that structure; a real
BraTS volume must map to plausible regions with a good quality figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tumorlens.atlas.harvard_oxford import UNLABELLED, labels
from tumorlens.atlas.regions import map_regions
from tumorlens.atlas.synthetic import make_case
from tumorlens.caveats import HEAD_TEMPLATE_FAILED


def _err(out: dict, case) -> float:
    return float(np.linalg.norm(np.array(out["lesion"]["centroid_mni_mm"]) - case.centroid_mni_mm))


@pytest.mark.parametrize(
    ("structure", "side", "max_err"),
    # measured (2 mm case, 3 mm working grid, affine only): 5.0 mm and 2.7 mm
    [("Left_Insular_Cortex", "left", 6.0), ("Right_Putamen", "right", 4.0)],
)
def test_planted_lesion_affine_comes_back_in_its_structure(structure, side, max_err):
    case = make_case(structure, spacing_mm=2.0, radius_mm=6.0)
    assert case.params["lesion_voxels"] > 20
    out = map_regions(case.volume, case.mask, deformable=False, working_spacing=3.0)
    pl = out["placement"]
    assert pl["method"] == "mni_registration" and not pl["low_confidence"]
    assert pl["quality"] > 0.9  # brain-mask Dice after warping
    top = out["regions"][0]
    assert top["label"] == structure and top["hemisphere"] == side and top["fraction"] > 0.8
    assert out["lesion"]["laterality"] == side and out["lesion"]["crosses_midline"] is False
    assert _err(out, case) < max_err


def test_a_head_turned_in_its_file_is_still_found():
    """A head turned 35 degrees about the vertical axis and tipped 20 degrees (a scan planned off the
    usual axes): the rigid stage starts from the best of a few rotations, not only the centred one
    (the centred start converged 12 mm off on a 30-degree turn while its quality figure passed)."""
    case = make_case("Right_Putamen", spacing_mm=2.0, radius_mm=6.0, rotation_deg=(20.0, 0.0, 35.0))
    out = map_regions(case.volume, case.mask, deformable=False, working_spacing=3.0)
    assert not out["placement"]["low_confidence"]
    assert out["regions"][0]["label"] == "Right_Putamen"
    assert _err(out, case) < 4.0


@pytest.mark.slow
def test_planted_lesion_deformable_centroid_within_target():
    """1 mm case, 2 mm working grid, affine + B-spline: the issue's 3 mm target (measured by
    bench/registration.py: 2.5 mm; the affine alone leaves 4.9 mm on this case)."""
    case = make_case("Left_Insular_Cortex")
    out = map_regions(case.volume, case.mask, deformable=True, working_spacing=2.0)
    assert "bspline" in out["placement"]["details"]["stages"]
    assert out["regions"][0]["label"] == "Left_Insular_Cortex"
    assert _err(out, case) < 3.0


def test_brats_volume_maps_to_plausible_regions(brats):
    from tumorlens.data import read_image, read_mask

    img = read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    mask = read_mask(brats / "pat0001" / "OTMultiClass.nii.gz", like=img)
    out = map_regions(img, mask, deformable=False, working_spacing=3.0)
    pl = out["placement"]
    assert pl["quality"] > 0.85 and not pl["low_confidence"]
    assert pl["details"]["quality"]["nmi"] > 1.08
    regs = out["regions"]
    assert len(regs) >= 3
    assert abs(sum(r["fraction"] for r in regs) - 1.0) < 0.01
    assert all(r["label"] in labels() or r["label"] == UNLABELLED for r in regs)
    assert [r["fraction"] for r in regs] == sorted((r["fraction"] for r in regs), reverse=True)
    # this glioma lies in the right temporal lobe / insula (measured: right temporal pole, insula,
    # middle temporal gyrus, putamen; centroid ~ (41, -12, -4) mm)
    right = sum(r["fraction"] for r in regs if r["hemisphere"] == "right")
    assert right > 0.9 and out["lesion"]["laterality"] == "right"
    x, y, z = out["lesion"]["centroid_mni_mm"]
    assert 25 < x < 60 and -40 < y < 15 and -25 < z < 20
    # per-voxel region map on the input grid agrees with the fractions
    rmap, m = out["region_map"], mask.numpy()[0] > 0
    assert rmap.shape == m.shape and (rmap[~m] == 0).all() and (rmap[m] > 0).all()
    share = float((rmap[m] == 1).mean())
    assert abs(share - regs[0]["fraction"]) < 0.1
    assert len(out["region_names"]) == len(regs)
    assert not any(HEAD_TEMPLATE_FAILED in n for n in out["notes"])


def _torso():
    """A torso-like phantom: body ellipse, dark lungs, bright spine; 3 x 3 x 4 mm voxels."""
    from monai.data import MetaTensor

    x, y, z = np.mgrid[-1:1:128j, -1:1:96j, -1:1:90j]
    torso = np.zeros(x.shape, np.float32)
    torso[(x / 0.95) ** 2 + (y / 0.7) ** 2 < 1] = 400
    for cx in (0.45, -0.45):
        torso[((x - cx) / 0.3) ** 2 + ((y + 0.05) / 0.4) ** 2 < 1] = 30
    torso[(x / 0.1) ** 2 + ((y + 0.55) / 0.1) ** 2 < 1] = 900
    torso += np.random.default_rng(1).normal(0, 15, torso.shape).astype(np.float32) * (torso > 0)
    return MetaTensor(torch.from_numpy(torso)[None], affine=torch.diag(torch.tensor([3.0, 3.0, 4.0, 1.0])))


def _slab(case, lo: int, hi: int, axis: int = 2):
    """Voxels lo:hi of a case along an axis, the affine moved with them: a scan of part of the head."""
    from monai.data import MetaTensor

    affine = case.volume.affine.clone()
    affine[:3, 3] += affine[:3, axis] * lo
    cut = (slice(None),) * (axis + 1) + (slice(lo, hi),)
    return (MetaTensor(case.volume[cut].clone(), affine=affine, meta=dict(case.volume.meta)),
            MetaTensor(case.mask[cut].clone(), affine=affine.clone()))


def test_a_scan_of_the_top_of_the_brain_is_placed_where_it_was_cut_from():
    """A slab holding the upper third of the brain (a precentral lesion, 2 mm slices): the moments start
    centred it on the whole template brain, the fit converged 36-73 mm off and the whole-brain Dice refused
    it (and the head check called it possibly not a head); a hemisphere was refused the same way. The start
    search now slides a slab along its short axis and the fit is judged inside its field of view. A slab of a
    textured ellipsoid stays refused."""
    from tumorlens.atlas.registration import head_template_check

    case = make_case("Left_Precentral_Gyrus", spacing_mm=2.0, radius_mm=6.0)
    z = np.nonzero(case.mask[0].numpy().any((0, 1)))[0]
    lo = int(z.mean()) - 12
    vol, mask = _slab(case, lo, case.volume.shape[-1])
    out = map_regions(vol, mask, deformable=False, working_spacing=3.0)
    pl = out["placement"]
    assert not pl["low_confidence"] and pl["details"]["quality"]["coverage"] < 0.5, pl
    assert out["regions"][0]["label"] == "Left_Precentral_Gyrus" and _err(out, case) < 4.0  # measured 0.6 mm
    assert any("partial coverage" in n for n in out["notes"]) and not any(HEAD_TEMPLATE_FAILED in n for n in out["notes"])
    assert head_template_check(vol)[1] is None
    # from 8 mm under the lesion's middle up: 18 % of the brain, too little to place, and said as such
    out = map_regions(*_slab(case, lo + 8, case.volume.shape[-1]), deformable=False, working_spacing=3.0)
    assert out["placement"]["low_confidence"] and out["regions"] == []
    assert any(HEAD_TEMPLATE_FAILED in n and "of the template brain" in n for n in out["notes"]), out["notes"]
    assert not any("did not reach a usable fit" in n for n in out["notes"])  # the fit itself was good
    # a sagittal slab holding the right hemisphere and 30 mm past the midline (refused before: whole-brain Dice)
    case = make_case("Right_Putamen", spacing_mm=2.0, radius_mm=6.0)
    x = np.nonzero(case.mask[0].numpy().any((1, 2)))[0]
    out = map_regions(*_slab(case, 0, int(x.mean()) + 15, axis=0), deformable=False, working_spacing=3.0)
    assert not out["placement"]["low_confidence"], out["placement"]
    assert out["regions"][0]["label"] == "Right_Putamen" and _err(out, case) < 4.0  # measured 2.6 mm
    # a slab of a head-sized ellipsoid with a smooth texture and a rim: its outline matches the brain's
    # inside the view (Dice 0.92), so only the stricter intensity test for slabs keeps it unplaced
    from monai.data import MetaTensor
    from scipy.ndimage import gaussian_filter

    x, y, z = np.mgrid[-1:1:96j, -1:1:112j, -1:1:90j]
    r = (x / 0.7) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2
    texture = gaussian_filter(np.random.default_rng(0).normal(0, 1, r.shape), 3) * 300 + 400
    phantom = (np.where(r < 1, texture, 0) + np.where((r > 0.85) & (r < 1), 400, 0)).astype(np.float32)[:, :, 30:62]
    lesion = np.zeros(phantom.shape, np.uint8)
    lesion[40:50, 40:50, 10:20] = 1
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    out = map_regions(MetaTensor(torch.from_numpy(phantom)[None], affine=affine),
                      MetaTensor(torch.from_numpy(lesion)[None], affine=affine), deformable=False, working_spacing=3.0)
    assert out["placement"]["low_confidence"] and out["regions"] == [], out["placement"]
    assert any(HEAD_TEMPLATE_FAILED in n for n in out["notes"]), out["notes"]


@pytest.mark.parametrize("axis", [0, 1], ids=["left-half", "front-or-back-half"])
def test_a_block_cut_along_two_axes_is_placed_where_it_was_cut_from(axis):
    """The top of the head cut again through the middle, sagittally or coronally (a precentral lesion), so the
    moments start is off along two axes. Slid along its shortest axis alone, the left-half block found a wrong
    rotation to make up for the other offset and was placed 26 mm off, in the postcentral gyrus, with full
    confidence (Dice 0.89); searched over both axes alone, the other block went 22 mm off the same way. Both
    starts are now fitted and the better outline kept: 1.3 and 3.6 mm."""
    import dataclasses

    case = make_case("Left_Precentral_Gyrus", spacing_mm=2.0, radius_mm=6.0)
    m = case.mask[0].numpy()
    z = np.nonzero(m.any((0, 1)))[0]
    c = int(np.nonzero(m.any(tuple(a for a in range(3) if a != axis)))[0].mean())
    vol, mask = _slab(case, int(z.mean()) - 28, case.volume.shape[-1])
    n = vol.shape[axis + 1]
    lo, hi = (0, c + 15) if c < n / 2 else (c - 15, n)
    block, block_mask = _slab(dataclasses.replace(case, volume=vol, mask=mask), lo, hi, axis=axis)
    out = map_regions(block, block_mask, deformable=False, working_spacing=3.0)
    pl = out["placement"]
    assert not pl["low_confidence"] and pl["details"]["quality"]["coverage"] < 0.6, pl
    assert out["regions"][0]["label"] == "Left_Precentral_Gyrus" and _err(out, case) < 4.0, (out["regions"][:2], _err(out, case))


def _knee():
    """A knee-like phantom: muscle in a rim of fat, two marrow-filled bones with dark cortex, a joint space;
    1.6 x 1.6 x 2 mm. A coarse affine fit squeezes its foreground onto the brain mask well (Dice 0.74)."""
    from monai.data import MetaTensor

    x, y, z = np.mgrid[-1:1:100j, -1:1:100j, -1:1:80j]
    knee = np.zeros(x.shape, np.float32)
    r2 = (x / 0.9) ** 2 + (y / 0.8) ** 2
    knee[r2 < 1] = 300
    knee[(r2 > 0.8) & (r2 < 1)] = 800
    bone = np.where(z > 0, 0.35 - 0.1 * z, 0.3 + 0.05 * z)
    d2 = (x + 0.1) ** 2 + y**2
    knee[d2 < bone**2] = 600
    knee[(d2 < bone**2) & (d2 > (bone - 0.05) ** 2)] = 20
    knee[np.abs(z) < 0.04] = 100
    knee += np.random.default_rng(2).normal(0, 15, knee.shape).astype(np.float32) * (knee > 0)
    return MetaTensor(torch.from_numpy(knee)[None], affine=torch.diag(torch.tensor([1.6, 1.6, 2.0, 1.0])))


def test_a_torso_is_not_placed_and_the_report_says_it_may_not_be_a_head():
    """A torso-like phantom (body ellipse, dark lungs, bright spine, 3 x 3 x 4 mm): the 2D network
    still calls it a tumour class, so the atlas stage must say that no head pose fits, and the report's
    limitations must carry it."""

    from tumorlens.findings.build import build_findings
    from tumorlens.report.facts import build_facts

    img = _torso()
    mask = np.zeros(img.shape[1:], np.uint8)
    mask[80:90, 40:50, 40:50] = 1
    out = map_regions(img, mask, deformable=False, working_spacing=3.0)
    assert out["placement"]["low_confidence"] and out["regions"] == []
    assert any(HEAD_TEMPLATE_FAILED in n for n in out["notes"]), out["notes"]
    findings = build_findings(img, {"glioma": 0.1, "meningioma": 0.8, "pituitary": 0.05, "no_tumor": 0.05},
                              masks=[("segmentation_head", mask)], atlas=out)
    assert any("may not be a brain MRI" in line for line in build_facts(findings).limitations())


def test_quality_figure_does_not_depend_on_the_voxel_size(brats):
    """The same brain at 1 mm, sampled to 3 mm and cut in 5 mm slices: all fits are usable (the transforms were measured
    1.5 mm apart) and the brain-mask Dice must say so. Masks thresholded after resampling scored the
    coarse copy 0.78 against 0.89 and refused it its regions."""
    from monai.data import MetaTensor

    from tumorlens.atlas.registration import register_to_mni
    from tumorlens.data import read_image

    img = read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    affine = img.affine.clone()
    affine[:3, :3] *= 3
    coarse = MetaTensor(img[:, ::3, ::3, ::3].contiguous(), affine=affine)
    affine = img.affine.clone()
    affine[:3, 2] *= 5
    thick = MetaTensor(img[:, :, :, ::5].contiguous(), affine=affine)  # 1 x 1 x 5 mm: finer and coarser than the grid
    fine_fit = register_to_mni(img, deformable=False, working_spacing=3.0)
    for other in (coarse, thick):
        fit = register_to_mni(other, deformable=False, working_spacing=3.0)
        assert fine_fit.confidence >= 0.5 and fit.confidence >= 0.5
        assert abs(fine_fit.quality_figure - fit.quality_figure) < 0.06


def test_the_deformable_stage_never_makes_the_fit_worse(brats):
    """The bundled 2 mm demo volume with its glioma left out of the metric: unchecked, the B-spline
    lowered the brain-mask Dice (0.893 -> 0.865); a warp that does that is dropped for the affine."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from tumorlens.atlas.registration import register_to_mni
    from tumorlens.data import read_image
    from tumorlens.paths import sample_studies_dir

    path = sample_studies_dir() / "brats_t1c_0001.nii.gz"
    labels = nib.load(brats / "pat0001" / "OTMultiClass.nii.gz")
    lesion = nib.Nifti1Image((np.asanyarray(labels.dataobj) > 0).astype(np.float32), labels.affine)
    lesion = np.asanyarray(resample_from_to(lesion, nib.load(path), order=1).dataobj) > 0.5
    img = read_image(path)
    affine_fit = register_to_mni(img, deformable=False, exclude_mask=lesion, working_spacing=2.0)
    full_fit = register_to_mni(img, deformable=True, exclude_mask=lesion, working_spacing=2.0)
    assert affine_fit.confidence >= 0.5
    assert full_fit.quality_figure >= affine_fit.quality_figure - 0.005
    assert full_fit.deformable or any("affine result kept" in n for n in full_fit.notes)


def test_predict_says_when_a_volume_is_probably_not_a_head(predictor, brats):
    """`predict` and the MONAI Label classification task do not register, so a torso was called a tumour
    class with the volume caveat alone. A coarse affine fit to the head template (about a second) now
    adds the head-template caveat; a BraTS brain passes it. `explain` registers fully and does not fit
    twice: one such note, its registration's; without the atlas step the coarse check speaks."""
    from tumorlens.atlas.registration import DICE_FLOOR, head_template_check
    from tumorlens.data import read_image
    from tumorlens.saliency import explain

    pred = predictor.predict(_torso())
    assert pred.extra["head_template_dice"] < DICE_FLOOR
    assert any(HEAD_TEMPLATE_FAILED in c and "coarse affine" in c for c in pred.extra["caveats"]), pred.extra
    dice, caveat = head_template_check(read_image(brats / "pat0002" / "T1c_subtrMeanDivStd.nii.gz"))
    assert dice > 0.85 and caveat is None
    # a head with its skull and scalp (nilearn's ICBM152 2009a T1, shipped in its package) is a head too
    import nilearn

    with_skull = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    dice, caveat = head_template_check(read_image(with_skull))
    assert dice > 0.85 and caveat is None
    # a knee whose outline the fit squeezes onto the brain's (Dice above the floor) still shares no
    # intensity structure with a head: its normalised MI says so (it passed as a head on Dice alone)
    dice, caveat = head_template_check(_knee())
    assert caveat is not None and HEAD_TEMPLATE_FAILED in caveat and "normalised MI" in caveat, (dice, caveat)
    # a head whose header gives 0.01 mm voxels is 2 mm across: no head at all, and likely a wrong header
    tiny = read_image(brats / "pat0002" / "T1c_subtrMeanDivStd.nii.gz")
    tiny.affine[:3, :3] *= 0.01
    dice, caveat = head_template_check(tiny)
    assert dice is None and caveat is not None and "smaller than a head along every axis" in caveat, caveat
    notes = explain(_torso(), method="gradcam", model=predictor.model).findings.notes
    assert sum(HEAD_TEMPLATE_FAILED in n for n in notes) == 1, notes
    # a slab too thin to register (under 60 mm) is judged by its cross-section: 12 slices of the torso
    # (384 x 288 x 48 mm) were called meningioma p = 0.98 with no caveat; 20 mm of a brain pass
    from monai.data import MetaTensor

    torso = _torso()
    slab = MetaTensor(torso[..., 40:52].clone(), affine=torso.affine.clone())
    pred = predictor.predict(slab)
    assert any(HEAD_TEMPLATE_FAILED in c and "wider than a head" in c for c in pred.extra["caveats"]), pred.extra
    brain = read_image(brats / "pat0002" / "T1c_subtrMeanDivStd.nii.gz")
    brain_slab = MetaTensor(brain[..., 60:80].clone(), affine=brain.affine.clone(), meta=dict(brain.meta))
    assert head_template_check(brain_slab) == (None, None)
    assert not any("coarse affine" in n for n in notes)  # the full registration's verdict, not a second fit
    # without the atlas step nothing else says whether it is a head: the coarse check does
    notes = explain(_torso(), method="gradcam", model=predictor.model, with_regions=False).findings.notes
    assert sum(HEAD_TEMPLATE_FAILED in n and "coarse affine" in n for n in notes) == 1, notes


def test_scoring_records_what_predict_would_caveat_about_the_image_itself(dev2d, dev_rows, brats):
    """The least certain images of a datastore were a torso phantom, a 64-voxel crop and a label file, handed out
    by the uncertainty strategy ahead of every brain volume: scoring records what ``predict`` would caveat
    about the image itself (``tests/test_volume_edges.py::test_classless_labels_come_last`` ranks them)."""
    from tumorlens.activelearning.scope import scope_problems
    from tumorlens.data import read_image

    assert scope_problems(read_image(dev2d / dev_rows[0]["image"])) == []
    assert scope_problems(read_image(brats / "pat0002" / "T1c_subtrMeanDivStd.nii.gz")) == []
    torso = scope_problems(_torso())
    assert torso and HEAD_TEMPLATE_FAILED in torso[0]


def test_a_registration_is_repeatable():
    """ITK's multi-threaded metric sums came out in another order from run to run: the bundled volume's B-spline
    stage was kept in 2 of 19 runs (confidence 0.78 instead of 0.58, another leading region; an outside probe,
    session 37). Registration runs on one thread now, and the same volume registers the same way every time."""
    from tumorlens.atlas.registration import register_to_mni
    from tumorlens.data import read_image
    from tumorlens.paths import sample_studies_dir

    img = read_image(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    runs = [register_to_mni(img, working_spacing=3.0) for _ in range(3)]
    params = [np.asarray(r.transform.GetParameters()) for r in runs]
    assert len({r.quality_figure for r in runs}) == 1 and len({r.confidence for r in runs}) == 1
    assert all(np.array_equal(params[0], p) for p in params[1:])
