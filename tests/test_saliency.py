"""Saliency maps, adaptive masks and explain, on real images and the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tumorlens.errors import InvalidInputError
from tumorlens.saliency.cam import grad_cams, score_cam, select_channels
from tumorlens.saliency.maps import saliency_maps
from tumorlens.saliency.threshold import adaptive_mask, brain_mask

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tumour_images(dev2d, tumour_rows):
    from tumorlens.data import read_image, read_mask

    out = []
    for r in tumour_rows[:10]:
        img = read_image(dev2d / r["image"])
        out.append((img, read_mask(dev2d / r["mask"], like=img).numpy()[0] > 0, r))
    return out


@pytest.fixture(scope="module")
def net_input(tumour_images):
    from tumorlens.inference import prepare_slice

    return torch.cat([prepare_slice(img.numpy()[0], 128) for img, _, _ in tumour_images[:3]])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_shared_pass_equals_monai_gradcam_and_gradcampp(model, net_input):
    """One shared pass gives the same maps as monai.visualize's two classes (run one after the other)."""
    from monai.visualize import GradCAM, GradCAMpp

    from tumorlens.models.dualhead import ClassifierView

    net = model.net
    x = torch.nn.functional.interpolate(net_input, size=model.image_size, mode="bilinear") \
        if net_input.shape[-1] != model.image_size else net_input
    ours = grad_cams(net, x)
    assert set(ours.maps) == {"gradcam", "gradcampp"}
    assert ours.seg_logits is not None and ours.seg_logits.shape == (len(x), 1, *x.shape[2:])
    view = ClassifierView(net).eval()  # else monai's hooks leave the shared net in train mode

    class PaperGradCAMpp(GradCAMpp):
        """monai's Grad-CAM++ (its hooks, activations and gradients) with the paper's alpha denominator,
        sum_ab(A_ab) * g_ij^3, where monai has sum_ab(A_ab * g_ab^3); how far the two formulas' maps lie
        apart depends on the model (correlation above 0.95 for cycle 12, 0.92 for cycle 15b), so the test
        compares like with like. monai multiplies the gradients by exp(score), a per-image constant."""

        def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):
            _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
            a, g = acti[layer_idx], grad[layer_idx]
            dims = tuple(range(2, a.ndim))
            denom = 2 * g.pow(2) + a.sum(dims, keepdim=True) * g.pow(3)
            alpha = g.pow(2) / torch.where(denom != 0, denom, torch.ones_like(denom))
            weights = (alpha * torch.relu(g)).sum(dims, keepdim=True)
            return torch.relu((weights * a).sum(1, keepdim=True))

    # one image per call, as monai's GradCAMpp broadcasts exp(score) [B] over the last spatial axis
    for name, cls, floor in (("gradcam", GradCAM, 0.999), ("gradcampp", PaperGradCAMpp, 0.999)):
        cam = cls(view, target_layers=f"net.{net.cam_layer}", postprocessing=lambda m: m)
        for b in range(len(x)):
            ref = cam(x[b:b + 1])[0, 0].detach()
            assert ours.maps[name][b].shape == ref.shape
            assert _corr(ours.maps[name][b], ref) > floor, name
    assert not net.training


def test_maps_on_input_grid_2d(model, tumour_images):
    img = tumour_images[0][0]
    sal = saliency_maps(img, ("gradcam", "gradcampp"), model)
    assert sal.target in ("glioma", "meningioma", "pituitary")
    for m in ("gradcam", "gradcampp"):
        h = sal.maps[m]
        assert isinstance(h, MetaTensor) and tuple(h.shape) == tuple(img.shape)
        assert torch.equal(h.affine, img.affine)
        a = h.numpy()[0]
        assert a.dtype == np.float32 and a.min() >= 0 and a.max() == pytest.approx(1.0)
        assert not a[~sal.brain].any(), "saliency outside the brain"


def test_maps_on_input_grid_volume(model, brats):
    """A BraTS volume, cropped to a slab of slices (a real crop: the affine moves with it)."""
    from tumorlens.data import read_image

    vol = read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    labels = read_image(brats / "pat0001" / "OTMultiClass.nii.gz").numpy()[0]
    z = int(np.argmax((labels > 0).sum((0, 1))))
    z0 = max(z - 4, 0)
    aff = vol.affine.clone()
    aff[:3, 3] = vol.affine[:3, :3] @ torch.tensor([0.0, 0.0, float(z0)], dtype=aff.dtype) + vol.affine[:3, 3]
    crop = MetaTensor(vol[:, :, :, z0:z0 + 8].clone(), affine=aff, meta={**vol.meta, "kind": "volume"})
    sal = saliency_maps(crop, ("gradcam", "gradcampp", "scorecam"), model, scorecam_mass=0.05)
    for h in sal.maps.values():
        assert tuple(h.shape) == tuple(crop.shape) and torch.equal(h.affine, crop.affine)
        assert 0 <= float(h.min()) and float(h.max()) == pytest.approx(1.0)
    assert sal.brain.shape == tuple(crop.shape[1:])
    assert any("ScoreCAM" in n for n in sal.notes)


def test_scorecam_batched_ranked_shapes_and_selection(model, net_input):
    x = net_input[:1]
    res = score_cam(model.net, x, mass=None, top_k=24, batch_size=8)
    assert res.maps["scorecam"].shape == (1, *x.shape[2:]) and float(res.maps["scorecam"].min()) >= 0
    # ranking: largest mean activation first, zero channels never scored, mass respected
    a = torch.zeros(6, 2, 2)
    a[0] = 5.0
    a[3] = 3.0
    a[5] = 2.0
    assert select_channels(a, mass=None).tolist() == [0, 3, 5]
    assert select_channels(a, mass=0.5).tolist() == [0]
    assert select_channels(a, mass=0.8).tolist() == [0, 3]
    assert select_channels(a, mass=0.99, top_k=1).tolist() == [0]


def test_threshold_adapts_to_the_map():
    """A peaked map gets a higher percentile (smaller mask) than a diffuse one; clean-up works."""
    yy, xx = np.mgrid[:128, :128]
    brain = (yy - 64) ** 2 + (xx - 64) ** 2 < 60 ** 2
    peaked = np.exp(-((yy - 50) ** 2 + (xx - 70) ** 2) / (2 * 5.0 ** 2))
    diffuse = np.exp(-((yy - 50) ** 2 + (xx - 70) ** 2) / (2 * 25.0 ** 2))
    speck = peaked.copy()
    speck[100, 30] = 0.9  # an isolated bright pixel must not survive as its own component
    tp, td, ts = adaptive_mask(peaked, brain), adaptive_mask(diffuse, brain), adaptive_mask(speck, brain)
    assert tp.percentile > td.percentile + 2
    assert tp.mask.sum() < td.mask.sum()
    assert tp.mask[50, 70] and td.mask[50, 70]
    assert not ts.mask[100, 30] and ts.mask[50, 70]
    ring = np.where(np.hypot(yy - 50, xx - 70) < 12, 1.0, 0.0)
    ring[48:53, 68:73] = 0.0  # a hole in a salient blob is filled
    assert adaptive_mask(ring, brain).mask[50, 70]
    assert not adaptive_mask(diffuse, brain).mask[~brain].any()
    with pytest.raises(ValueError, match="shape"):
        adaptive_mask(peaked, brain[:64])


def test_threshold_adapts_per_real_image(model, tumour_images):
    pcts = []
    for img, _, _ in tumour_images[:8]:
        sal = saliency_maps(img, ("gradcampp",), model)
        th = adaptive_mask(sal.maps["gradcampp"].numpy()[0], sal.brain)
        assert th.mask.any() and not th.mask[~sal.brain].any()
        pcts.append(round(th.percentile, 2))
    assert len(set(pcts)) >= 3, f"percentile did not adapt: {pcts}"


def test_brain_mask_is_the_head(tumour_images):
    img = tumour_images[0][0].numpy()[0]
    b = brain_mask(img)
    assert 0.1 < b.mean() < 0.9
    assert not b[0].any() and not b[-1].any()  # the image border is background


def test_gradcam_max_inside_tumour_on_most_images(model, tumour_images):
    """Pointing game on a small real sample ("most": >= 6/10). The model trained with the localisation
    loss hits 0.625 on 40 grouped-validation images (the models before it: 0.075); the issue's
    target for the best method, >= 0.90, is not reached yet."""
    hits = []
    for img, truth, _ in tumour_images:
        sal = saliency_maps(img, ("gradcam",), model)
        h = sal.maps["gradcam"].numpy()[0]
        hits.append(bool(truth[np.unravel_index(int(np.argmax(h)), h.shape)]))
    assert np.mean(hits) >= 0.6, f"Grad-CAM maximum inside the tumour on {sum(hits)}/{len(hits)} images"


def test_explain_writes_all_files(model, tumour_images, tmp_path):
    import nibabel as nib
    import slicerio

    from tumorlens.findings import Findings
    from tumorlens.saliency import explain

    img, truth, row = tumour_images[1]
    expl = explain(img, method="gradcam", model=model, patient={"age": 61, "sex": "F"})
    files = expl.write(tmp_path / "out")
    for name in ("findings.json", "mask.nii.gz", "heatmap.nii.gz", "mask.seg.nrrd", "overlay.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    f = Findings.load(files["findings"])
    assert f == expl.findings and f.input.file == row["image"].split("/")[-1]
    assert f.saliency.method == "gradcam" and 80 <= f.saliency.percentile <= 99.5
    assert {m.source for m in f.masks} == {"segmentation_head", "saliency:gradcam"}
    outline, salient = expl.seg_mask.numpy()[0] > 0, expl.mask.numpy()[0] > 0
    assert f.saliency.outline_inside_fraction == round(float((outline & salient).sum() / outline.sum()), 4)
    assert f.input.modality_from == "assumed"  # a JPEG records no modality
    assert f.patient.age == 61
    assert f.regions or any("region" in n for n in f.notes)  # named, or a note says why not
    m = nib.load(files["mask"])
    assert m.shape == (*truth.shape, 1) and np.allclose(m.affine, img.affine.numpy())
    assert np.array_equal(np.asarray(m.dataobj)[..., 0], expl.mask.numpy()[0])
    h = np.asarray(nib.load(files["heatmap"]).dataobj)
    assert h.min() >= 0 and h.max() <= 1
    seg = slicerio.read_segmentation(str(files["seg_nrrd"]))
    names = [s["name"] for s in seg["segments"]]
    assert "segmentation head" in names
    lesion = [n for n in names if n.startswith("salient area")]
    assert len(lesion) == 1
    for r in f.regions[:3]:
        assert r.name in lesion[0]
    vox = slicerio.extract_segments(seg, [(lesion[0], 1)])["voxels"]
    assert int((vox > 0).sum()) == int(expl.mask.numpy().sum())
    assert (tmp_path / "out" / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the clinical descriptions the image matched (issue 8), from the active prompt file
    from tumorlens.alignment.prompts import load_descriptions

    desc = load_descriptions()
    assert len(f.text_matches) == 3
    sims = [t.similarity for t in f.text_matches]
    assert sims == sorted(sims, reverse=True) and all(-1 <= v <= 1 for v in sims)
    assert all(t.description in desc[t.class_name] for t in f.text_matches)
    assert f.text_matches[0].class_name == f.classification.label == row["label"]


def test_volume_findings_match_descriptions_through_the_most_tumour_like_slice(model, brats):
    from tumorlens.alignment.api import text_matches
    from tumorlens.data import read_image
    from tumorlens.inference import Predictor

    img = read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    pred = Predictor(model).predict(img)
    matches, why = text_matches(model, img, pred.slice_probabilities)
    assert why is None and len(matches) == 3 and matches[0]["class_name"] in ("glioma", "meningioma")
    with pytest.raises(InvalidInputError, match="k must be"):
        text_matches(model, img, pred.slice_probabilities, k=0)


def test_bad_input_typed_errors(model, tmp_path, dev2d, tumour_rows):
    from PIL import Image

    from tumorlens.cli import main
    from tumorlens.data import read_image
    from tumorlens.saliency import explain

    zero = tmp_path / "zero.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(zero)
    with pytest.raises(InvalidInputError, match="zero.png"):
        explain(zero, model=model)
    with pytest.raises(InvalidInputError, match="constant"):
        saliency_maps(read_image(zero), ("gradcam",), model)
    assert main(["explain", str(zero), "--out", str(tmp_path / "o"), "--no-regions"]) == 2
    assert not (tmp_path / "o" / "findings.json").exists()
    # patient context from the command line (there was no way but editing findings.json), checked before any work
    good = dev2d / tumour_rows[0]["image"]
    for bad in (["--age", "200"], ["--history", "Mr John Smith MRN 1234567, headaches"]):
        assert main(["explain", str(good), "--out", str(tmp_path / "p"), "--no-regions", *bad]) == 2
        assert not (tmp_path / "p").exists()
    assert main(["explain", str(good), "--out", str(tmp_path / "p"), "--no-regions", "--age", "54", "--sex", "F",
                 "--history", "known breast cancer, new headaches"]) == 0
    from tumorlens.findings import Findings

    rec = Findings.load(tmp_path / "p" / "findings.json")
    assert (rec.patient.age, rec.patient.sex, rec.patient.clinical_history) == (54, "F", "known breast cancer, new headaches")
    # a mask of another shape, listed in a real manifest folder -> typed error naming the mask
    from tumorlens.saliency.evaluate import evaluate_saliency

    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    r = tumour_rows[0]
    (d / r["image"]).symlink_to(dev2d / r["image"])
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / r["mask"])
    (d / "manifest.csv").write_text(f"image,label,mask\n{r['image']},{r['label']},{r['mask']}\n")
    with pytest.raises(InvalidInputError, match="does not match image shape"):
        evaluate_saliency(d, methods=("gradcam",), n=1, model=model)


def test_evaluate_saliency_cli(model, tumour_rows, subset_factory, tmp_path):
    import json

    from tumorlens.cli import main

    d = subset_factory(tumour_rows[:2])
    out = tmp_path / "res.json"
    assert main(["evaluate-saliency", str(d), "--methods", "gradcam,gradcampp", "--n", "2", "--json", str(out),
                 "--overlays", str(tmp_path / "ov"), "--n-overlays", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 2 and set(res["methods"]) == {"gradcam", "gradcampp"}
    for s in res["methods"].values():
        assert 0 <= s["pointing_game"] <= 1 and 0 <= s["dice"] <= 1 and 0 <= s["deletion_auc"] <= 1
        # the fair floor beside it: the same map moved by half the image, per image (a random pixel order is a
        # harsher perturbation than any contiguous map, so every map had looked unfaithful against it)
        assert 0 <= s["deletion_auc_moved"] <= 1 and s["deletion_faster_than_moved"] in (0.0, 0.5, 1.0)
    assert all("deletion_auc_moved" in r["gradcam"] and r["image"].endswith(".jpg") for r in res["per_image"])
    assert 0 <= res["segmentation_head"]["dice"] <= 1 and res["random_deletion_auc"] is not None
    for m, s in res["methods"].items():  # the tolerant game counts every strict hit; a hit is 0 px away
        rows = [r[m] for r in res["per_image"]]
        assert all((r["distance_px"] == 0) == r["hit"] for r in rows)
        assert s["pointing_game_tolerant"] >= s["pointing_game"]
        assert s["pointing_game_tolerant"] == np.mean([r["distance_px"] <= res["pointing_tolerance_px"] for r in rows])
        for c, v in s["pointing_game_per_class"].items():
            assert v == np.mean([r[m]["hit"] for r in res["per_image"] if r["label"] == c])
    assert "gradcampp_vs_gradcam" in res
    assert len(list((tmp_path / "ov").glob("*.png"))) == 1
    fast = tmp_path / "fast.json"
    assert main(["evaluate-saliency", str(d), "--methods", "gradcam", "--n", "2", "--deletion-steps", "0",
                 "--json", str(fast)]) == 0
    res0 = json.loads(fast.read_text())
    assert res0["methods"]["gradcam"]["deletion_auc"] is None and res0["random_deletion_auc"] is None
    assert res0["methods"]["gradcam"]["pointing_game"] == res["methods"]["gradcam"]["pointing_game"]


def test_hooks_ignore_other_threads_forward_passes(model):
    """A server runs requests on one shared model from several threads: while one request's Grad-CAM
    hook is registered, another thread's forward must not replace the activations it captured."""
    import threading

    from tumorlens.saliency.cam import capture

    store: dict = {}
    layer = model.net.get_submodule(model.net.cam_layer)
    handle = layer.register_forward_hook(capture(store, "a"))
    try:
        x = torch.zeros(1, 1, 64, 64)
        with torch.no_grad():
            other = threading.Thread(target=lambda: model.net(x + 1.0))
            other.start()
            other.join()
            assert "a" not in store, "a forward in another thread was captured"
            model.net(x)
        assert "a" in store and store["a"].shape[0] == 1
    finally:
        handle.remove()


def test_cluster_scorecam_close_to_scoring_every_channel(model, dev2d, dev_rows):
    """Cluster-ScoreCAM scores k k-means centres instead of every channel: fewer forwards, nearly
    the same map (the benchmark compares it with the plain version on more images)."""
    from tumorlens.data import read_image
    from tumorlens.saliency.cam import cluster_channels

    row = next(r for r in dev_rows if r["label"] == "glioma")
    x = saliency_maps(read_image(dev2d / row["image"]), ("gradcam",), model).net_input
    every = score_cam(model.net, x, mass=None).maps["scorecam"][0]
    clustered = score_cam(model.net, x, mass=None, clusters=32).maps["scorecam"][0]
    corr = float(np.corrcoef(every.flatten().numpy(), clustered.flatten().numpy())[0, 1])
    assert corr > 0.95, corr
    a = torch.rand(50, 4, 4)
    centres, member = cluster_channels(a, 8)
    assert centres.shape == (8, 4, 4) and member.shape == (50,) and set(member.tolist()) <= set(range(8))


def test_findings_notes_never_quote_the_input_path(model, brats, tmp_path):
    """A registration error starts with the file's path; quoted in a note, the folders of a clinical export
    ("Smith_John_MRN1234567/...") put a patient's name in findings.json. The note keeps only the problem."""
    import json

    import nibabel as nib

    from tumorlens.saliency import explain

    src = nib.load(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    slab = np.asanyarray(src.dataobj)[:, :, 54:74]  # 20 mm through the tumour: too thin to register to MNI
    folder = tmp_path / "Smith_John_MRN1234567"
    folder.mkdir()
    path = folder / "Smith_John_19700101.nii.gz"
    nib.save(nib.Nifti1Image(slab, src.affine), path)
    expl = explain(path, method="gradcam", model=model)
    text = json.dumps(expl.findings.to_dict() if hasattr(expl.findings, "to_dict") else expl.findings.model_dump())
    assert any(n.startswith("atlas regions not computed: field of view") for n in expl.findings.notes), expl.findings.notes
    for word in ("Smith", "MRN", "19700101", str(tmp_path)):
        assert word not in text, word


def test_explain_never_overwrites_its_input_nor_mixes_two_explanations(model, tumour_images, tmp_path):
    """`explain out/mask.nii.gz --out out` replaced its own input with the new mask; and an explanation with
    one method left the maps of an earlier one with all methods beside its findings."""
    import hashlib

    import nibabel as nib

    from tumorlens.saliency import explain

    img, _, _ = tumour_images[1]
    out = tmp_path / "out"
    first = explain(img, method="all", model=model)
    first.write(out)
    assert (out / "heatmap_gradcampp.nii.gz").exists()
    from tumorlens.report import generate_report

    generate_report(first.findings, backend="template").write(out)  # the README's pattern: report beside it
    second = explain(img, method="gradcam", model=model)
    second.write(out)
    assert not any(out.glob("heatmap_*.nii.gz")) and not any(out.glob("mask_*.nii.gz"))
    # the first explanation's report went with it (it had stayed beside the findings of another image)
    assert not (out / "report.md").exists() and not (out / "report.json").exists()
    assert {p.name for p in out.iterdir()} >= {"findings.json", "mask.nii.gz", "heatmap.nii.gz", "overlay.png"}
    # the slice itself stored as out/mask.nii.gz, explained into out: refused, the file kept as it was
    src = out / "mask.nii.gz"
    nib.save(nib.Nifti1Image(img.numpy()[0][..., None].astype(np.float32), np.eye(4)), src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    expl = explain(src, method="gradcam", model=model)
    with pytest.raises(InvalidInputError, match="overwrite this input"):
        expl.write(out)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


def test_library_calls_refuse_what_they_would_misread(model, predictor, tumour_images):
    """A Python user's in-memory arrays (probe, session 35): NaN pixels were classified (glioma p 0.80, empty
    mask), a [H, W] MetaTensor was called 'constant' (its first row was taken as the image), an [H, W, 3]
    picture was misread too, a raw image gave confident wrong class descriptions, one NaN
    gave an empty saliency mask, and methods="gradcam" was split into letters."""
    from tumorlens.alignment import nearest_descriptions
    from tumorlens.findings.build import classification
    from tumorlens.inference import prepare_slice

    img, truth, _row = tumour_images[0]
    arr = img.numpy()[0]
    nan = arr.copy()
    nan[arr > np.percentile(arr, 90)] = np.nan
    with pytest.raises(InvalidInputError, match="non-finite"):
        predictor.predict(MetaTensor(torch.from_numpy(nan[None]), affine=img.affine))
    with pytest.raises(InvalidInputError, match="non-finite"):
        saliency_maps(MetaTensor(torch.from_numpy(nan[None]), affine=img.affine), "gradcam", model)
    with pytest.raises(InvalidInputError, match=r"\[1, H, W\].*got shape \({}, {}\)".format(*arr.shape)):
        predictor.predict(MetaTensor(torch.from_numpy(arr)))
    with pytest.raises(InvalidInputError, match="colour picture"):
        predictor.predict(MetaTensor(torch.from_numpy(np.repeat(arr[..., None], 3, -1))))
    with pytest.raises(InvalidInputError, match="2D slice"):
        prepare_slice(np.stack([arr, arr]), model.image_size)

    # one method by name is that method; its map, as returned ([1, H, W]), thresholds against the brain [H, W]
    maps = saliency_maps(img, "gradcam", model)
    assert set(maps.maps) == {"gradcam"}
    th = adaptive_mask(maps.maps["gradcam"], maps.brain)
    assert th.mask.shape == arr.shape and th.mask.any()
    heat = maps.maps["gradcam"].numpy()[0].copy()
    heat[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="non-finite"):
        adaptive_mask(heat, maps.brain)

    # the text head takes prepared inputs only: an image as read is refused, the prepared one matches its class
    with pytest.raises(InvalidInputError, match="normalised"):
        nearest_descriptions(model, img)
    prepared = prepare_slice(arr, model.image_size)
    with pytest.raises(InvalidInputError, match="0..1"):
        nearest_descriptions(model, prepared * 255)
    assert nearest_descriptions(model, prepared, k=1)[0]["class_name"] == predictor.predict(img).label

    with pytest.raises(InvalidInputError, match="exactly the classes"):
        classification({"a": 1.0})
    with pytest.raises(InvalidInputError, match="sum to 1"):
        classification({"glioma": 1.0, "meningioma": 1.0, "no_tumor": 0.0, "pituitary": 0.0})


def test_the_overlay_says_which_way_the_patient_lies_and_draws_millimetres(model, brats, dev2d, tmp_path):
    """An outside probe (session 37) read the volume overlay as the patient's left: it is drawn radiologically
    with no side marked, beside an mni.png drawn neurologically; a 2 x 4 x 2 mm volume came out squashed to
    half its length; a no-tumour slice's hot map did not say it explains glioma. Each panel now carries the
    patient's directions where the file gives them (none for a picture, which says it is shown as stored), the
    pixels keep their millimetre shape, and the cautions of the findings are in the caption."""
    import nibabel as nib
    from conftest import write_mr_slice
    from PIL import Image

    from tumorlens.saliency import explain
    from tumorlens.saliency.output import _display, overlay_caveats

    src = nib.load(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    vol = np.asanyarray(src.dataobj)[:, ::2, 50:80]  # every second voxel from front to back: 1 x 2 x 1 mm
    aff = src.affine.copy()
    aff[:3, 1] *= 2
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / "aniso.nii.gz")
    expl = explain(tmp_path / "aniso.nii.gz", method="gradcam", model=model, with_regions=False)
    d = _display(expl)
    sizes = np.sqrt((aff[:3, :3] ** 2).sum(0))
    assert d.edges == (("A", "P"), ("R", "L")) and d.aspect == pytest.approx(sizes[1] / sizes[0])
    assert "axial slice" in d.where and " mm)" in d.where
    assert any("volume read slice by slice" in c for c in overlay_caveats(expl))
    # a slice stored with its columns toward the patient's right is marked so; a picture is not marked
    arr = np.asarray(Image.open(dev2d / "images" / "0117.jpg").convert("L")).astype(np.uint16) * 4
    mirrored = write_mr_slice(arr[:, ::-1], tmp_path / "mirrored.dcm", orientation=(-1, 0, 0, 0, 1, 0),
                              position=(102.0, -102.0, 40.0), spacing=(0.8, 0.8))
    assert _display(explain(mirrored, method="gradcam", model=model, with_regions=False)).edges == (("A", "P"),
                                                                                                   ("L", "R"))
    picture = explain(dev2d / "images" / "0117.jpg", method="gradcam", model=model, with_regions=False)
    assert _display(picture).edges is None and picture.target == picture.findings.classification.label


def test_a_volume_registration_could_not_start_on_says_so_in_its_placement(model, tmp_path):
    """A 40 mm slab cannot be registered: its record said placement "none", low_confidence false, as if no one had
    tried (session 39 audit); it says now that the registration failed and why, with no regions."""
    import nibabel as nib

    from tumorlens.paths import sample_studies_dir
    from tumorlens.saliency import explain

    ref = nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    a = np.asanyarray(ref.dataobj)
    c = [s // 2 for s in a.shape]
    aff = ref.affine.copy()
    aff[:3, 3] = ref.affine[:3, :3] @ np.array([c[0] - 20, c[1] - 20, c[2] - 10]) + ref.affine[:3, 3]
    nib.save(nib.Nifti1Image(a[c[0] - 20:c[0] + 20, c[1] - 20:c[1] + 20, c[2] - 10:c[2] + 10], aff),
             tmp_path / "slab.nii.gz")
    f = explain(tmp_path / "slab.nii.gz", model=model).findings
    assert f.placement.method == "mni_registration" and f.placement.low_confidence and f.placement.confidence == 0.0
    assert "too small for a whole brain" in f.placement.details["failed"] and not f.regions


def test_the_mni_picture_outlines_the_mapped_area_not_only_its_centroid(model, tmp_path):
    """mni.png showed a red dot for a 198 ml salient area (session 39 audit: issue 4 asks for a picture of the
    lesion on the template): the mapped area is outlined now, its centroid marked apart."""
    from PIL import Image

    from tumorlens.paths import sample_studies_dir
    from tumorlens.saliency import explain

    expl = explain(sample_studies_dir() / "brats_t1c_0001.nii.gz", method="gradcam", model=model)
    assert expl.findings.regions and len(expl.atlas["mni_points"]) > 1000
    png = np.asarray(Image.open(expl.write(tmp_path / "out")["mni"]).convert("RGB")).astype(int)
    red = (png[..., 0] > 200) & (png[..., 1] < 60) & (png[..., 2] < 60)
    yellow = (png[..., 0] > 200) & (png[..., 1] > 200) & (png[..., 2] < 60)
    assert red.sum() > 500 and yellow.sum() > 50, (red.sum(), yellow.sum())
