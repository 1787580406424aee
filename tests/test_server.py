"""The MONAI Label app through the real server and the real ``monailabel`` client (loopback only).

One server for the whole module (started once, on a copy of the bundled samples); tests run in
file order: inference, bad input, load, active learning, then the relabel loop that trains.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from tumorlens.labels import CLASS_NAMES
from tumorlens.paths import sample_studies_dir

pytest.importorskip("monailabel")
from conftest import write_mr_slice  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from tumorlens.serving.process import ServerProcess  # noqa: E402

MODELS = ("classification", "segmentation", "saliency_gradcam", "saliency_gradcampp", "saliency_scorecam", "report")
LOAD_SECONDS = float(os.environ.get("TUMORLENS_LOAD_SECONDS", "45"))
SERVER_ENV = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "TUMORLENS_MAX_UPLOAD_MB": "16",
              "OMP_WAIT_POLICY": "PASSIVE"}


def status_of(exc: MONAILabelClientException) -> int:
    m = re.search(r"Status: (\d+)", str(exc.msg))
    return int(m.group(1)) if m else -1


def studies_snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the datastore (images, labels, index) with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".tumorlens" not in p.parts and p.name != ".lock"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("server") / "my studies"  # a space: the monailabel launcher had split the path
    shutil.copytree(sample_studies_dir(), d)
    for p in d.iterdir():
        p.chmod(0o644)
    return d


@pytest.fixture(scope="module")
def server(studies):
    env = dict(SERVER_ENV, MONAI_LABEL_SESSION_PATH=str(studies.parent / "sessions"))
    # through the product command: ``tumorlens serve`` execs ``monailabel start_server`` with the app
    srv = ServerProcess(studies, env=env, log_path=studies.parent / "server.log", via_cli=True)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


@pytest.fixture(scope="module")
def base_model():
    from tumorlens.models import load_model

    return load_model()


def clean_reference(path: Path) -> dict[str, float]:
    """The in-process answer of tumorlens for ``path``, computed in a fresh interpreter: other tests in
    this session may have touched the cached model object (hooks, alignment caches)."""
    import subprocess
    import sys

    code = ("import json,sys; from tumorlens.inference import Predictor; from tumorlens.data import read_image; "
            "print(json.dumps(Predictor().predict(read_image(sys.argv[1])).probabilities))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def infer_json(client, model, image_id, params=None, file=None):
    out, res = client.infer(model, image_id, params or {}, file=file)
    return out, (json.loads(res) if isinstance(res, (bytes, str)) else res)


def alive(client) -> None:
    assert "classification" in client.info()["models"]


# ---- /info/ and inference ------------------------------------------------------------------------

def test_a_server_started_on_a_path_with_a_space_logs_to_its_own_file(server, studies):
    """``tumorlens serve`` on "my studies" (the monailabel launcher had split the path in two), and ``GET /logs/``
    shows this server's log, one per datastore in the work folder (every server of the checkout had written
    monai_app/logs/app.log, and each one's /logs/ showed the others' image ids)."""
    logs = list((studies.parent / "work" / "logs").glob("*/app.log"))
    assert len(logs) == 1
    r = requests.get(f"{server.url}/logs/", params={"lines": 5000, "text": "true"}, timeout=30)
    assert r.status_code == 200 and str(studies) in r.text
    assert r.text.strip().splitlines()[-1] in logs[0].read_text()


def test_info_lists_tasks(client):
    info = client.info()
    models = info["models"]
    assert models["classification"]["type"] == "classification"
    assert models["classification"]["labels"] == {c: i for i, c in enumerate(CLASS_NAMES)}
    assert models["segmentation"]["type"] == "segmentation" and models["segmentation"]["labels"] == {"tumor": 1}
    for name, m in models.items():
        assert m["dimension"] in (2, 3), name
    assert set(info["strategies"]) == {"random", "uncertainty", "saliency_disagreement"}
    assert "tumorlens" in info["trainers"]
    assert set(info["scoring"]) == {"uncertainty", "saliency_disagreement"}
    assert info["datastore"]["total"] == 7
    assert info["model_version"].startswith("base:")


def test_upload_and_classify_matches_in_process(client, dev2d, base_model):

    src = dev2d / "images" / "2500.jpg"
    assert client.upload_image(str(src), image_id="upload_2500", params={})["image"] == "upload_2500"
    out, res = infer_json(client, "classification", "upload_2500")
    assert out is None  # JSON only
    probs = res["probabilities"]
    assert list(probs) == list(CLASS_NAMES) and abs(sum(probs.values()) - 1) < 1e-4
    assert res["label"] == max(probs, key=probs.get)
    assert [p["label"] for p in res["prediction"]] == list(CLASS_NAMES)
    assert res["model"]["version"].startswith("base:")  # the served version (the prediction's own did replace it)
    ref = clean_reference(src)
    for c in CLASS_NAMES:
        assert abs(probs[c] - ref[c]) < 1e-4, (c, probs[c], ref[c])
    fam = res["familiarity"]  # a figshare training-source slice: well inside the training distribution
    assert fam["familiar"] is True and fam["score"] >= fam["threshold"]
    # the same file sent with the request, not through the datastore
    _, res2 = infer_json(client, "classification", "", file=str(src))
    for c in CLASS_NAMES:
        assert abs(res2["probabilities"][c] - ref[c]) < 1e-4


def test_a_photograph_sent_to_the_server_carries_the_not_mri_caveats(client, dev2d, tmp_path):
    """What a MONAI Label client reads for a photograph sent with the request (not stored): the class the
    grey network gives it, and the caveats that it is in colour while MRI is grey and, for a grey texture
    filling its frame, that no dark air surrounds a head; an MRI slice has neither."""
    import skimage.data
    from PIL import Image

    from tumorlens.caveats import IN_COLOUR, NO_DARK_BORDER

    cat = tmp_path / "cat.jpg"
    Image.fromarray(skimage.data.chelsea()).save(cat, quality=90)
    _, res = infer_json(client, "classification", "", file=str(cat))
    assert res["label"] in CLASS_NAMES and sum(IN_COLOUR in c for c in res["caveats"]) == 1, res["caveats"]
    page = tmp_path / "page.png"
    Image.fromarray(skimage.data.page()).save(page)
    _, res = infer_json(client, "classification", "", file=str(page))
    assert sum(NO_DARK_BORDER in c for c in res["caveats"]) == 1 and not any(IN_COLOUR in c for c in res["caveats"])
    _, res = infer_json(client, "classification", "", file=str(dev2d / "images" / "2500.jpg"))
    assert not any(IN_COLOUR in c or NO_DARK_BORDER in c for c in res["caveats"]), res["caveats"]
    alive(client)


def test_segmentation_2d_label_overlays_image(client, base_model):
    from PIL import Image

    from tumorlens.data import read_image
    from tumorlens.inference import Predictor

    out, res = infer_json(client, "segmentation", "mri2d_1941")
    assert out.endswith(".png") and res["label_names"] == {"tumor": 1}
    lab = np.asarray(Image.open(out))
    img = read_image(sample_studies_dir() / "mri2d_1941.jpg")
    assert lab.shape == tuple(img.shape[1:]) and lab.dtype == np.uint8
    assert set(np.unique(lab)) <= {0, 1}
    ref = Predictor(base_model).predict(img).mask.numpy()[0]
    assert (lab == ref).mean() > 0.999
    assert res["voxels"] == int(lab.sum())


def test_2d_labels_land_on_the_jpeg_as_3d_slicer_places_it(client, studies, tmp_path):
    """3D Slicer (ITK) loads a JPEG with column i, row j at LPS (i, j): the NRRD / NIfTI mask of a 2D
    image must land on the same pixels there as the PNG answer does on the array, and a label Slicer
    saves on that geometry must be read back on the same pixels (a square image hid a transposition)."""
    import SimpleITK as sitk
    from PIL import Image

    from tumorlens.activelearning.finetune import read_label_like
    from tumorlens.data import read_image

    png, _ = infer_json(client, "segmentation", "mri2d_1941")
    ref = np.asarray(Image.open(png)) > 0  # [row, col]
    assert ref.any()
    jpg = sitk.ReadImage(str(studies / "mri2d_1941.jpg"), sitk.sitkFloat32)  # Slicer's geometry
    for ext in (".nrrd", ".nii.gz"):
        out, _ = infer_json(client, "segmentation", "mri2d_1941", {"result_extension": ext})
        lab = sitk.ReadImage(out)
        if lab.GetDimension() == 3 and jpg.GetDimension() == 2:
            lab = lab[:, :, 0]
        on_jpg = sitk.Resample(lab, jpg, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        got = sitk.GetArrayFromImage(on_jpg) > 0  # numpy of a 2D ITK image: [row, col]
        assert (got == ref).mean() > 0.999, ext
    # a label drawn in Slicer on the JPEG: a block at rows 40-59, columns 100-139
    drawn = np.zeros((jpg.GetSize()[1], jpg.GetSize()[0]), np.uint8)
    drawn[40:60, 100:140] = 1
    lab = sitk.GetImageFromArray(drawn)
    lab.CopyInformation(jpg)
    for ext in (".nrrd", ".nii.gz"):
        f = tmp_path / f"drawn{ext}"
        sitk.WriteImage(lab, str(f))
        back = read_label_like(f, read_image(studies / "mri2d_1941.jpg"))
        assert back.shape == drawn.shape and (back == drawn).all(), ext


def _oblique_copy(src: Path, dest: Path) -> tuple[np.ndarray, np.ndarray]:
    """A cropped copy of the sample volume stored in another voxel order (axes permuted and flipped,
    origin moved): the same anatomy in world space."""
    im = nib.load(src)
    data = np.asanyarray(im.dataobj)[:, :, 28:44]
    aff = im.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ np.array([0, 0, 28]) + aff[:3, 3]
    small = nib.Nifti1Image(data, aff)
    ornt = nib.orientations.axcodes2ornt(("S", "L", "P"))
    cur = nib.orientations.io_orientation(aff)
    xf = nib.orientations.ornt_transform(cur, ornt)
    moved = small.as_reoriented(xf)
    nib.save(moved, dest)
    return np.asarray(moved.affine), xf


def test_segmentation_volume_lands_on_input_geometry(client, studies, tmp_path, base_model):
    from tumorlens.data import read_image
    from tumorlens.inference import Predictor

    f = tmp_path / "oblique.nii.gz"
    aff, xf = _oblique_copy(sample_studies_dir() / "brats_t1c_0001.nii.gz", f)
    client.upload_image(str(f), image_id="vol_sli", params={})
    out, res = infer_json(client, "segmentation", "vol_sli")
    assert out.endswith(".nii.gz")
    lab = nib.load(out)
    img = read_image(f)
    assert lab.shape == tuple(img.shape[1:])
    assert np.allclose(lab.affine, aff, atol=1e-4)
    assert np.asanyarray(lab.dataobj).dtype == np.uint8
    ref = Predictor(base_model).predict(img).mask.numpy()[0]
    assert (np.asanyarray(lab.dataobj) == ref).mean() > 0.999
    # largest_cc, as MONAI Label's sample apps take it, keeps the largest connected part (it was accepted and ignored)
    from scipy import ndimage

    out_cc, _ = infer_json(client, "segmentation", "vol_sli", {"largest_cc": True})
    cc = np.asanyarray(nib.load(out_cc).dataobj)
    assert ndimage.label(cc)[1] == 1 and not (cc & ~(np.asanyarray(lab.dataobj) > 0)).any()
    assert cc.sum() == max(np.bincount(ndimage.label(ref > 0)[0].ravel())[1:])
    # NRRD (what 3D Slicer's plugin asks for) carries the same geometry
    import SimpleITK as sitk

    out_nrrd, _ = infer_json(client, "segmentation", "vol_sli", {"result_extension": ".nrrd"})
    nrrd = sitk.ReadImage(out_nrrd)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(nrrd.GetDirection()).reshape(3, 3) * np.asarray(nrrd.GetSpacing())[None, :]
    lps[:3, 3] = nrrd.GetOrigin()
    assert np.allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, aff, atol=1e-4)
    assert np.array_equal(np.transpose(sitk.GetArrayFromImage(nrrd), (2, 1, 0)), np.asanyarray(lab.dataobj))
    # OHIF's MONAI Label extension asks for uint16 without compression and reads the raw bytes as a Uint16Array:
    # the header must say so and the data be exactly that (both were ignored: gzip'd uint8)
    out_ohif, _ = infer_json(client, "segmentation", "vol_sli",
                             {"result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False})
    raw = Path(out_ohif).read_bytes()
    header, data = raw.split(b"\n\n", 1)
    assert b"type: unsigned short" in header and b"encoding: raw" in header, header
    assert len(data) == 2 * lab.get_fdata().size
    assert np.array_equal(np.frombuffer(data, "<u2").reshape(lab.shape[::-1]).transpose(2, 1, 0),
                          np.asanyarray(lab.dataobj))
    with pytest.raises(MONAILabelClientException) as e:
        infer_json(client, "segmentation", "vol_sli", {"result_extension": ".nrrd", "result_dtype": "complex64"})
    assert status_of(e.value) == 400 and "result_dtype" in e.value.msg
    # ... and is accepted back as a label of that image
    assert client.save_label("vol_sli", out_nrrd, tag="original", params={})["label"] == "vol_sli"
    # the same anatomy in its original voxel order gives the same mask, voxel for voxel in world space
    back = nib.orientations.apply_orientation(np.asanyarray(lab.dataobj), nib.orientations.orientation_inverse(xf)
                                              if hasattr(nib.orientations, "orientation_inverse") else _inv(xf))
    orig = nib.Nifti1Image(back, nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz").affine)
    out2, _ = infer_json(client, "segmentation", "", file=str(_crop_original(tmp_path)))
    m2 = np.asanyarray(nib.load(out2).dataobj)
    assert m2.shape == back.shape and orig.shape == back.shape
    if m2.sum() + back.sum():
        dice = 2 * np.logical_and(m2 > 0, back > 0).sum() / ((m2 > 0).sum() + (back > 0).sum())
        assert dice > 0.98, dice


def _inv(xf: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(xf)
    for i, (ax, flip) in enumerate(xf):
        inv[int(ax)] = (i, flip)
    return inv


def _crop_original(tmp_path: Path) -> Path:
    im = nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    aff = im.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ np.array([0, 0, 28]) + aff[:3, 3]
    out = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(im.dataobj)[:, :, 28:44], aff), out)
    return out


def test_dicom_2d_upload_and_segmentation(client, dev2d, tmp_path):
    from PIL import Image

    from tumorlens.data import read_image

    arr = np.asarray(Image.open(dev2d / "images" / "1500.jpg").convert("L"))
    f = tmp_path / "slice.dcm"
    write_mr_slice(arr, f)
    client.upload_image(str(f), image_id="dcm_1500", params={})
    out, res = infer_json(client, "segmentation", "dcm_1500")
    assert out.endswith(".nii.gz") and res["input"]["kind"] == "image2d"
    lab = nib.load(out)
    img = read_image(f)
    assert lab.shape == (*img.shape[1:], 1)
    assert np.allclose(lab.affine, np.asarray(img.affine), atol=1e-4)
    _, cls = infer_json(client, "classification", "dcm_1500")
    assert cls["label"] in CLASS_NAMES


def test_session_images_are_inferred_like_datastore_images(client, studies, tmp_path):
    """Slicer's MONAI Label module sends a volume that is not in the datastore as a session
    (PUT /session/, as NIfTI or as Slicer's own NRRD) and then infers with ``session_id``: the
    answer must be the datastore one's."""
    import SimpleITK as sitk

    nrrd = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(studies / "brats_t1c_0001.nii.gz")), str(nrrd))
    for image_id, src in (("brats_t1c_0001", nrrd), ("brats_t1c_0001", None), ("mri2d_1941", None)):
        src = src or next(studies.glob(image_id + ".*"))
        session_id = client.create_session(str(src))["session_id"]
        try:
            for model in ("classification", "segmentation"):
                out_s, res_s = client.infer(model, "", {}, session_id=session_id)
                res_s = json.loads(res_s) if isinstance(res_s, (bytes, str)) else res_s
                _, res_d = infer_json(client, model, image_id)
                assert res_s["label"] == res_d["label"], (image_id, model)
                for c in CLASS_NAMES:
                    assert abs(res_s["probabilities"][c] - res_d["probabilities"][c]) < 1e-5
                if model == "segmentation":
                    assert res_s["voxels"] == res_d["voxels"] and out_s and os.path.getsize(out_s) > 0
                # the caveats a client reads: the familiarity note too (the bundled volume is unfamiliar),
                # and a volume that fits the head template gets no head caveat
                assert res_s["caveats"] == res_d["caveats"]
                if image_id == "brats_t1c_0001":
                    assert not res_d["familiarity"]["familiar"]
                    assert res_d["caveats"][0].startswith("image is unlike the training images")
                    assert res_d["head_template_dice"] > 0.8
                    assert not any("head template" in c for c in res_d["caveats"])
        finally:
            client.remove_session(session_id)
    with pytest.raises(MONAILabelClientException) as e:  # an expired or unknown session: a clear 404
        client.infer("classification", "", {}, session_id="no-such-session")
    assert status_of(e.value) == 404 and "session" in str(e.value)
    # a session file named after the patient: the name came back in the session's info, in every answer and in
    # the refusal of an unreadable one (with the server's session folder)
    named = tmp_path / "Oddsson_Brynhild_19580214.jpg"
    named.write_bytes((studies / "mri2d_1941.jpg").read_bytes())
    created = client.create_session(str(named))
    try:
        _, res = client.infer("classification", "", {}, session_id=created["session_id"])
        answers = json.dumps(created) + (res.decode() if isinstance(res, bytes) else json.dumps(res))
        assert "Oddsson" not in answers and "19580214" not in answers
    finally:
        client.remove_session(created["session_id"])
    broken = tmp_path / "Oddsson_Brynhild_19580214.nii.gz"
    broken.write_bytes(b"not a volume at all")
    r = requests.put(f"{client._server_url}/session/", files={"files": (broken.name, broken.read_bytes())}, timeout=60)
    assert r.status_code == 400 and "Oddsson" not in r.text and "sessions" not in r.text, r.text[:300]
    alive(client)


def test_ids_with_spaces_and_accents_like_slicer_node_names(client, server, tmp_path):
    """3D Slicer names uploads after the volume node ("3: T2 FLAIR") and users' datastore folders hold
    file names with spaces and accents: upload, infer and save a label under such ids; ids that would
    leave the datastore folder or hide a file stay refused."""
    src = sample_studies_dir() / "mri2d_1941.jpg"
    for image_id in ("3: T2 FLAIR", "Fall 07 (ünïcode)+"):
        assert client.upload_image(str(src), image_id=image_id, params={})["image"] == image_id
        try:
            out, res = infer_json(client, "segmentation", image_id)
            assert res["input"]["file"] == image_id and res["label"] in CLASS_NAMES
            saved = client.save_label(image_id, out, tag="final", params={"class_name": res["label"]})
            assert saved["image"] == image_id
        finally:
            assert requests.delete(f"{server.url}/datastore/image", params={"id": image_id}, timeout=60).ok
    for bad in ("../escape", ".hidden", " leading space", "a/b", "a\\b", "x" * 161):
        with pytest.raises(MONAILabelClientException) as e:
            client.upload_image(str(src), image_id=bad, params={})
        assert status_of(e.value) == 400 and "invalid image id" in str(e.value.msg), bad
    # without image=, the id is the file name less its image extension: MONAI Label cut at the first dot,
    # so every DICOM-UID-named file became image "1"
    for uid in ("1.2.840.113619.2.55.3.604688119.868", "1.2.840.113619.2.55.3.604688119.869"):
        r = requests.put(f"{server.url}/datastore/image", files={"file": (f"{uid}.jpg", src.read_bytes())}, timeout=60)
        assert r.status_code == 200 and r.json()["image"] == uid, r.text[:300]
        assert requests.delete(f"{server.url}/datastore/image", params={"id": uid}, timeout=60).ok
    alive(client)


def test_saliency_tasks(client):
    info = client.info()["models"]
    missing = [m for m in ("saliency_gradcam", "saliency_gradcampp", "saliency_scorecam") if m not in info]
    assert not missing, f"saliency tasks not offered: {missing}"
    from PIL import Image

    from tumorlens.findings import Findings

    for name in ("saliency_gradcam", "saliency_gradcampp", "saliency_scorecam"):
        # atlas placement once (Grad-CAM++); the other methods without it, to keep CI short
        params = {} if name == "saliency_gradcampp" else {"with_regions": False, "scorecam_mass": 0.5}
        out, res = infer_json(client, name, "mri2d_1941", params)
        f = Findings.model_validate(res["findings"])
        assert f.classification.label in CLASS_NAMES
        lab = np.asarray(Image.open(out))
        assert lab.shape == (256, 256)
        assert set(np.unique(lab)) - {0} <= set(res["label_names"].values())
        assert (lab > 0).sum() == next(m.voxels for m in f.masks if m.source.startswith("saliency"))
        if name == "saliency_gradcampp":
            assert f.placement.method != "none" or f.notes
            names = set(res["label_names"])
            assert names == {"salient area"} or names <= {r.label for r in f.regions}, names
    out, res = infer_json(client, "saliency_gradcam", "mri2d_1941", {"heatmap": True, "with_regions": False})
    heat = np.asarray(Image.open(out))
    assert res["heatmap"] is True and heat.shape == (256, 256) and heat.max() > 0
    # 3D Slicer's MONAILabel module asks every answer as uint8 labels: a float heatmap written so showed as
    # nothing at all; it is a 400 that says why, before any work
    r = requests.post(f"{client._server_url}/infer/saliency_gradcam", params={"image": "mri2d_1941"},
                      data={"params": json.dumps({"heatmap": True, "result_extension": ".nrrd", "result_dtype": "uint8"})},
                      timeout=60)
    assert r.status_code == 400 and "cannot show" in r.text, r.text[:300]


def test_volume_saliency_and_report(client, studies):
    """A 3D datastore volume through a saliency task (registration to MNI152, regions) and the report
    task: the label is a NIfTI on the volume's own grid whose values are the named regions."""
    from tumorlens.findings import Findings

    out, res = infer_json(client, "saliency_gradcampp", "brats_t1c_0001")
    f = Findings.model_validate(res["findings"])
    src = nib.load(studies / "brats_t1c_0001.nii.gz")
    lab = nib.load(out)
    assert lab.shape[:3] == src.shape and np.allclose(lab.affine, src.affine, atol=1e-3)
    assert f.input.kind == "volume" and f.placement.method == "mni_registration"
    values = set(np.unique(np.asarray(lab.dataobj)).astype(int)) - {0}
    # every named value holds voxels and the values run 1..N without a gap: 3D Slicer's MONAILabel module
    # gives value v the v-th name by value, so a gap shifted every later region's name (this volume had one)
    assert values == set(res["label_names"].values()) == set(range(1, len(res["label_names"]) + 1))
    if not f.placement.low_confidence:  # one value per named region of the findings record
        for name in set(res["label_names"]) - {"salient area"}:
            assert any(r.name in name for r in f.regions), (name, [r.name for r in f.regions])
    _, rep = infer_json(client, "report", "brats_t1c_0001", {"findings": res["findings"], "backend": "template"})
    assert rep["verification"]["supported"] is True and rep["markdown"]


def test_report_task(client):
    assert "report" in client.info()["models"], "the report task is not offered"
    out, res = infer_json(client, "report", "mri2d_1941")
    assert out is None
    assert res["findings"]["classification"]["label"] in CLASS_NAMES
    assert res["report"] and isinstance(res["verification"]["supported"], bool) and res["markdown"]
    # the findings behind it come from Grad-CAM, the primary method (Grad-CAM++'s mask lies on the edge slices
    # of a volume, and a report from it described a place the tumour is not)
    assert res["findings"]["saliency"]["method"] == "gradcam"
    assert client.info()["models"]["report"]["config"]["method"] == "gradcam"
    # findings sent with the request: the report is built from them, not from the image
    f = dict(res["findings"])
    _, res2 = infer_json(client, "report", "mri2d_1941", {"findings": f, "backend": "template"})
    assert res2["verification"]["backend"] == "template" and res2["verification"]["supported"] is True
    assert res2["findings"]["classification"] == f["classification"]
    with pytest.raises(MONAILabelClientException) as ei:
        client.infer("report", "mri2d_1941", {"findings": {"schema_version": "1.0", "bogus": 1}})
    assert status_of(ei.value) == 400 and "findings" in str(ei.value.msg)
    # another image's record: its report would be filed under this image (in a datastore, another patient)
    other = next(i for i in client.datastore()["objects"] if i != "mri2d_1941" and not i.startswith("brats"))
    with pytest.raises(MONAILabelClientException) as ei:
        client.infer("report", other, {"findings": f, "backend": "template"})
    assert status_of(ei.value) == 400 and "mri2d_1941" in str(ei.value.msg)
    # a value refused as an identifier is named by its field, never quoted back
    named = json.loads(json.dumps(f))
    named["patient"] = {"clinical_history": "NHS number 943 476 5919, headaches"}
    with pytest.raises(MONAILabelClientException) as ei:
        client.infer("report", "mri2d_1941", {"findings": named, "backend": "template"})
    assert status_of(ei.value) == 400 and "clinical_history" in str(ei.value.msg)
    assert "943" not in str(ei.value.msg) and "headaches" not in str(ei.value.msg)
    # patient context: in params.patient, checked before any work; sent elsewhere it is a 400, not ignored
    resized = json.loads(json.dumps(f))
    resized["input"]["dims"] = [d + 1 for d in resized["input"]["dims"]]  # the same name, another picture
    with pytest.raises(MONAILabelClientException) as ei:
        client.infer("report", "mri2d_1941", {"findings": resized, "backend": "template"})
    assert status_of(ei.value) == 400 and "pixels, not this one" in str(ei.value.msg)
    for params, said in (({"age": 54}, "params.patient"), ({"gender": "F"}, "params.patient"),
                         ({"patient": {"age": -3}}, "age"),
                         ({"patient": {"clinical_history": "Mr John Smith MRN 1234567"}}, "identifiers"),
                         ({"patient": {"age": 50}, "findings": f}, "record's own patient field")):
        with pytest.raises(MONAILabelClientException) as ei:
            client.infer("report", "mri2d_1941", dict(params, backend="template"))
        assert status_of(ei.value) == 400 and said in str(ei.value.msg) and "Smith" not in str(ei.value.msg)


# ---- bad input: 4xx with a message, the server keeps serving, the datastore is unchanged ------------

def test_bad_input_is_rejected_and_nothing_changes(client, server, studies, tmp_path):
    before = studies_snapshot(studies)
    cases = []

    notimg = tmp_path / "notes.jpg"
    notimg.write_text("this is not an image\n" * 50)
    cases.append(("non-image upload", lambda: client.upload_image(str(notimg), image_id="notes", params={}), 400, "notes"))
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes((sample_studies_dir() / "brats_t1c_0001.nii.gz").read_bytes()[:4000])
    cases.append(("corrupt NIfTI", lambda: client.upload_image(str(corrupt), image_id="broken", params={}), 400, "broken"))
    cases.append(("unknown image id", lambda: client.infer("classification", "no_such_image", {}), 404, "no_such_image"))
    cases.append(("unknown model", lambda: client.infer("no_such_model", "mri2d_1941", {}), 404, "no_such_model"))
    cases.append(("../ infer", lambda: client.infer("classification", "../../etc/passwd", {}), 400, "invalid image id"))
    cases.append(("../ upload", lambda: client.upload_image(str(sample_studies_dir() / "mri2d_1941.jpg"),
                                                           image_id="../escape", params={}), 400, "invalid image id"))
    cases.append(("../ label", lambda: client.save_label("../mri2d_1941", str(notimg), tag="final", params={}),
                  400, "invalid image id"))
    wrong = tmp_path / "wrong.png"
    from PIL import Image

    Image.fromarray(np.ones((64, 64), np.uint8)).save(wrong)
    cases.append(("label of another shape", lambda: client.save_label("mri2d_1941", str(wrong), tag="final",
                                                                      params={"class_name": "glioma"}), 400, "shape"))
    cases.append(("unknown class", lambda: client.save_label("mri2d_1941", str(wrong), tag="final",
                                                             params={"class_name": "astrocytoma"}), 400, ""))
    cases.append(("unknown strategy", lambda: client.next_sample("no_such_strategy", {}), 404, "no_such_strategy"))
    for what, call, code, needle in cases:
        with pytest.raises(MONAILabelClientException) as ei:
            call()
        assert status_of(ei.value) == code, (what, ei.value.msg)
        assert needle in str(ei.value.msg), (what, ei.value.msg)
        alive(client)
    # an oversized request is refused before it is read
    big = b"\0" * (17 * 1024 * 1024)
    r = requests.put(f"{server.url}/datastore/image?image=huge", files={"file": ("huge.nii.gz", big)}, timeout=60)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    # the same without a Content-Length (a chunked upload): stopped while it is read, still a 413

    def chunks():
        yield (b'--B\r\nContent-Disposition: form-data; name="file"; filename="huge.nii.gz"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(17):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--B--\r\n"

    r = requests.put(f"{server.url}/datastore/image?image=huge", data=chunks(), timeout=60,
                     headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413 and "too large" in r.json()["detail"], r.text[:300]
    alive(client)
    # requests MONAI Label 0.8.5 itself answers with a 500 (or starts a doomed training process for)
    url, jpg = server.url, (sample_studies_dir() / "mri2d_1941.jpg").read_bytes()
    vol = nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    elsewhere = np.zeros(vol.shape, np.uint8)
    elsewhere[40:60, 40:60, 20:30] = 1  # the volume's shape, but 3 mm voxels from the origin: another place
    elsewhere_nii = tmp_path / "elsewhere.nii.gz"
    nib.save(nib.Nifti1Image(elsewhere, np.diag([-3.0, 3.0, 3.0, 1.0])), elsewhere_nii)
    http_cases = [
        ("infer params nested too deeply", "post", "/infer/segmentation?image=mri2d_1941",
         {"data": {"params": "[" * 100_000 + "]" * 100_000}}, 400, "nested too deeply"),
        ("label params nested too deeply", "put", "/datastore/label?image=mri2d_1941&tag=final",
         {"files": {"label": ("mri2d_1941.png", jpg)}, "data": {"params": '{"a":' * 50_000 + "1" + "}" * 50_000}},
         400, "nested too deeply"),
        ("volume label of the right shape on another grid", "put", "/datastore/label?image=brats_t1c_0001&tag=grid",
         {"files": {"label": ("brats_t1c_0001.nii.gz", elsewhere_nii.read_bytes())}}, 400, "does not lie on the image"),
        ("infer params not JSON", "post", "/infer/segmentation?image=mri2d_1941", {"data": {"params": "{oops"}},
         400, "not valid JSON"),
        ("infer params a list", "post", "/infer/segmentation?image=mri2d_1941", {"data": {"params": "[1]"}},
         400, "JSON object"),
        ("image from a JSON-only task", "post", "/infer/classification?image=mri2d_1941&output=image", {},
         400, "JSON only"),
        ("DICOM-SEG output", "post", "/infer/segmentation?image=mri2d_1941&output=dicom_seg", {}, 400, "dicom_seg"),
        ("upload params not JSON", "put", "/datastore/image?image=params_oops",
         {"files": {"file": ("params_oops.jpg", jpg)}, "data": {"params": "{oops"}}, 400, "params"),
        ("label params a list", "put", "/datastore/label?image=mri2d_1941&tag=final",
         {"files": {"label": ("mri2d_1941.png", jpg)}, "data": {"params": "[1]"}}, 400, "JSON object"),
        ("image info not JSON", "put", "/datastore/image/info?image=mri2d_1941", {"data": {"info": "{oops"}},
         400, "info"),
        ("training setting", "post", "/train/tumorlens", {"json": {"max_epochs": "abc"}}, 400, "max_epochs"),
        # a learning rate that turns the weights to NaN, an endless run, a misspelt setting, an unknown choice
        ("absurd learning rate", "post", "/train/tumorlens", {"json": {"lr": 1e30}}, 400, "lr must be at most"),
        ("endless run", "post", "/train/tumorlens", {"json": {"max_epochs": 1e12}}, 400, "max_epochs must be at most"),
        ("misspelt setting", "post", "/train/tumorlens", {"json": {"max_epoch": 50}}, 400, "did you mean 'max_epochs'"),
        ("another name for lr", "post", "/train/tumorlens", {"json": {"learning_rate": 0.5}}, 400, "'lr'"),
        ("unknown trainable part", "post", "/train/tumorlens", {"json": {"trainable": "decoder"}}, 400, "heads, all"),
        ("patient name and birth date as image id", "put", "/datastore/image?image=Smith_John_19700101",
         {"files": {"file": ("Smith_John_19700101.jpg", jpg)}}, 400, "patient identifier"),
        ("no_tumor label with a tumour drawn", "put", "/datastore/label?image=mri2d_1941&tag=final",
         {"files": {"label": ("mri2d_1941.png", _mask_of("1941").read_bytes())},
          "data": {"params": json.dumps({"class_name": "no_tumor"})}}, 400, "outlines"),
        ("unknown trainer", "post", "/train/no_such_trainer", {"json": {}}, 404, "no_such_trainer"),
        ("unknown batch model", "post", "/batch/infer/no_such_model", {}, 404, "no_such_model"),
        ("unknown scoring method", "post", "/scoring/no_such_method", {}, 404, "no_such_method"),
        ("dataset before any final label", "get", "/datastore/dataset", {}, 404, "final label"),
        ("info of an unknown image", "get", "/datastore/image/info?image=no_such_image", {}, 404, "no_such_image"),
        ("model upload", "put", "/model/segmentation", {"files": {"file": ("x.pt", b"junk")}}, 405, "POST /train/"),
        ("model delete", "delete", "/model/segmentation", {}, 405, "POST /train/"),
    ]
    for what, method, path, kwargs, code, needle in http_cases:
        r = getattr(requests, method)(url + path, timeout=120, **kwargs)
        assert r.status_code == code and needle in r.json()["detail"], (what, r.status_code, r.text[:300])
    assert requests.get(f"{url}/train/?check_if_running=true", timeout=30).status_code == 404  # none started
    assert "19700101" not in (studies.parent / "server.log").read_text()  # the request line is logged redacted
    alive(client)
    assert studies_snapshot(studies) == before


def test_sessions_uploads_and_info_updates_cannot_lose_or_corrupt_data(client, server, studies, tmp_path):
    """What a client nobody here wrote can send: archives whose members climb out of the session
    store, a different image under an existing id, info that would mislabel training data, checksums
    in every spelling MONAI Label's clients use, and malformed parameters. Each is a 4xx with a
    message (or the right answer); nothing stored changes; the server keeps serving."""
    import glob
    import hashlib
    import tarfile
    import tempfile

    from PIL import Image

    url = server.url
    before = studies_snapshot(studies)
    jpg = (studies / "mri2d_1941.jpg").read_bytes()

    # a tar member named ../NAME would land beside the unpack folder: refused before anything is written
    escape = f"tumorlens_escape_{os.getpid()}_{time.time_ns()}.txt"
    bad_tar = io.BytesIO()
    with tarfile.open(fileobj=bad_tar, mode="w:gz") as t:
        for name in (f"../{escape}", "/" + escape):
            info = tarfile.TarInfo(name)
            info.size = 4
            t.addfile(info, io.BytesIO(b"pwnd"))
    r = requests.put(f"{url}/session/?uncompress=true", files={"files": ("series.tar.gz", bad_tar.getvalue())},
                     timeout=60)
    assert r.status_code == 400 and "outside" in r.json()["detail"], r.text[:300]
    assert not (Path(tempfile.gettempdir()) / escape).exists() and not Path("/" + escape).exists()
    r = requests.put(f"{url}/session/?uncompress=true", files={"files": ("slice.jpg", jpg)}, timeout=60)
    assert r.status_code == 400 and "zip or tar" in r.json()["detail"], r.text[:300]
    # a session must hold an image: a file the readers cannot open is refused at upload, and not kept
    store = studies.parent / "sessions"
    kept = set(os.listdir(store)) if store.is_dir() else set()
    received = set(glob.glob(os.path.join(tempfile.gettempdir(), "tmp*")))
    for name, data in (("notes.nii.gz", b"not an image at all"), ("cut.jpg", jpg[: len(jpg) // 3])):
        r = requests.put(f"{url}/session/", files={"files": (name, data)}, timeout=60)
        assert r.status_code == 400 and f"session upload {name}" in r.json()["detail"], r.text[:300]
    r = requests.put(f"{url}/session/", files=[("files", ("a.txt", b"x")), ("files", ("b.txt", b"y"))], timeout=60)
    assert r.status_code == 400 and "session upload" in r.json()["detail"], r.text[:300]
    assert (set(os.listdir(store)) if store.is_dir() else set()) == kept
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "tmp*"))) <= received  # nothing left behind
    # a real archive (a one-slice DICOM series in a wrapper folder, with a note beside it) becomes a
    # session folder that inference reads
    arr = np.asarray(Image.open(studies / "mri2d_1941.jpg").convert("L"))
    write_mr_slice(arr, tmp_path / "slice.dcm")
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(tmp_path / "slice.dcm", "series/slice.dcm")
        zf.writestr("series/README.txt", "exported by a viewer\n")
    # a CD/PACS export zipped on a Mac: DICOMDIR beside the series, a __MACOSX resource folder
    z2 = io.BytesIO()
    with zipfile.ZipFile(z2, "w") as zf:
        zf.write(tmp_path / "slice.dcm", "export/DICOM/S1/IM0001")
        zf.writestr("export/DICOMDIR", b"\0" * 132)
        zf.writestr("__MACOSX/export/._DICOMDIR", b"\0" * 16)
    r = requests.put(f"{url}/session/?uncompress=true", files={"files": ("cd.zip", z2.getvalue())}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    _, res = client.infer("classification", "", {}, session_id=r.json()["session_id"])
    assert json.loads(res)["label"] in CLASS_NAMES
    client.remove_session(r.json()["session_id"])
    r = requests.put(f"{url}/session/?uncompress=true", files={"files": ("series.zip", z.getvalue())}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    sid = r.json()["session_id"]
    _, res = client.infer("classification", "", {}, session_id=sid)
    assert json.loads(res)["label"] in CLASS_NAMES
    r = requests.get(f"{url}/session/{sid}?image=true", timeout=30)  # a folder is not one file
    assert r.status_code == 400 and "folder" in r.json()["detail"]
    client.remove_session(sid)
    # an expired session is gone when it is asked for, not at the next sweep
    r = requests.put(f"{url}/session/?expiry=1", files={"files": ("slice.jpg", jpg)}, timeout=60)
    sid = r.json()["session_id"]
    time.sleep(2.2)
    assert requests.get(f"{url}/session/{sid}", timeout=30).status_code == 404

    # uploads: the same bytes again are a no-op; another image under a taken id is a 409
    assert client.upload_image(str(studies / "mri2d_1941.jpg"), image_id="mri2d_1941", params={})["image"] == "mri2d_1941"
    resaved = tmp_path / "again.nii"  # the same volume written again: other bytes, same voxels and geometry
    ref = nib.load(studies / "brats_t1c_0001.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(ref.dataobj), ref.affine, ref.header), resaved)
    assert resaved.read_bytes() != (studies / "brats_t1c_0001.nii.gz").read_bytes()
    assert client.upload_image(str(resaved), image_id="brats_t1c_0001", params={})["image"] == "brats_t1c_0001"
    # 3D Slicer's MONAILabel module sends the JPEG it opened back as the one-slice NIfTI it holds (column x row,
    # LPS) before saving a label: the same picture, not "another image" (it was a 409 and the label was lost)
    import SimpleITK as sitk

    as_slicer = tmp_path / "mri2d_1941.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(sitk.ReadImage(str(studies / "mri2d_1941.jpg"))), str(as_slicer))
    stored = (studies / "mri2d_1941.jpg").read_bytes()
    assert client.upload_image(str(as_slicer), image_id="mri2d_1941", params={})["image"] == "mri2d_1941"
    assert (studies / "mri2d_1941.jpg").read_bytes() == stored and not (studies / "mri2d_1941.nii.gz").exists()
    sitk.WriteImage(sitk.JoinSeries(sitk.ReadImage(str(studies / "mri2d_3300.jpg"))), str(as_slicer))
    with pytest.raises(MONAILabelClientException) as ei:  # another picture sent so is still another image
        client.upload_image(str(as_slicer), image_id="mri2d_1941", params={})
    assert status_of(ei.value) == 409
    other = tmp_path / "mri2d_1941.jpg"
    other.write_bytes((studies / "mri2d_3300.jpg").read_bytes())
    with pytest.raises(MONAILabelClientException) as ei:
        client.upload_image(str(other), image_id="mri2d_1941", params={})
    assert status_of(ei.value) == 409 and "already holds another image" in str(ei.value.msg)
    # a JPEG sent without a file name is named by its content in the error (MONAI Label assumes .nii.gz)
    r = requests.put(f"{url}/datastore/image?image=nameless", files={"file": ("", jpg)}, timeout=60)
    assert r.status_code == 400 and "looks like a JPEG" in r.json()["detail"], r.text[:300]
    bomb = io.BytesIO()
    Image.new("L", (12000, 12000)).save(bomb, format="PNG")  # ~140 KB declaring 144 megapixels
    r = requests.put(f"{url}/datastore/image?image=bomb", files={"file": ("bomb.png", bomb.getvalue())}, timeout=60)
    assert r.status_code == 400 and "larger than" in r.json()["detail"], r.text[:300]

    # checksums: bare, with the algorithm, any case; a wrong digest is a 404, an unknown algorithm a 400
    digest = hashlib.sha256(jpg).hexdigest()
    for cs in (digest, f"SHA256:{digest}", f"sha256:{digest}", f"MD5:{hashlib.md5(jpg).hexdigest()}"):
        assert requests.head(f"{url}/datastore/image?image=mri2d_1941&check_sum={cs}", timeout=30).status_code == 200, cs
    assert requests.head(f"{url}/datastore/image?image=mri2d_1941&check_sum={'0' * 64}", timeout=30).status_code == 404
    assert requests.head(f"{url}/datastore/image?image=mri2d_1941&check_sum=FOO:1", timeout=30).status_code == 400

    cases = [
        ("info of an unknown image", "put", "/datastore/image/info?image=nope", {"data": {"info": "{}"}}, 404, "nope"),
        ("image info naming the id", "put", "/datastore/image/info?image=mri2d_1941",
         {"data": {"info": json.dumps({"id": "mri2d_0102"})}}, 400, "id"),
        ("image info with an unknown class", "put", "/datastore/image/info?image=mri2d_1941",
         {"data": {"info": json.dumps({"class_name": "astrocytoma"})}}, 400, "astrocytoma"),
        ("label info of an unknown label", "put", "/datastore/label/info?label=mri2d_1941&tag=final",
         {"data": {"info": json.dumps({"class_name": "glioma"})}}, 404, "final"),
        ("deprecated label info route", "put", "/datastore/updatelabelinfo?label=mri2d_1941&tag=final",
         {"data": {"params": json.dumps({"class_name": "glioma"})}}, 404, "final"),
        ("read info of an unknown label", "get", "/datastore/label/info?label=mri2d_1941&tag=final", {}, 404, "final"),
        ("delete an unknown label", "delete", "/datastore/label?id=mri2d_1941&tag=final", {}, 404, "final"),
        ("infer without an image", "post", "/infer/classification", {}, 400, "no image"),
        ("WSI route, unknown model", "post", "/infer/wsi_v2/no_such_model?image=mri2d_1941", {}, 404, "no_such_model"),
        ("WSI form not JSON", "post", "/infer/wsi_v2/classification?image=mri2d_1941", {"data": {"wsi": "{bad"}},
         400, "wsi is not valid JSON"),
        ("WSI form field of the wrong type", "post", "/infer/wsi_v2/classification?image=mri2d_1941",
         {"data": {"wsi": json.dumps({"level": "x"})}}, 400, "wsi.level"),
        ("batch inference over a misspelt image set", "post", "/batch/infer/classification?run_sync=true",
         {"json": {"images": "unlabelled"}}, 400, "unlabelled"),
        ("ScoreCAM mass not a number", "post", "/infer/saliency_scorecam?image=mri2d_1941",
         {"data": {"params": json.dumps({"scorecam_mass": "abc"})}}, 400, "scorecam_mass"),
        ("seed not a number", "post", "/activelearning/random", {"json": {"seed": [1]}}, 400, "seed"),
        ("hold below zero", "post", "/activelearning/random", {"json": {"hold_seconds": -1}}, 400, "hold_seconds"),
        ("max_compute not a number", "post", "/activelearning/uncertainty", {"json": {"max_compute": "abc"}},
         400, "max_compute"),
        ("training with nothing labelled", "post", "/train/tumorlens?run_sync=true", {"json": {}}, 400,
         "nothing to train on"),
        ("DICOMweb proxy of a local datastore", "get", "/proxy/dicom/studies", {}, 404, "local folder"),
        # an outside sweep of the OpenAPI (session 33): a 500, and 200s that stored what they should not
        ("log tail past C's size", "get", "/logs/?lines=99999999999999999999&text=true", {}, 400, "lines"),
        ("image info with a non-numeric time", "put", "/datastore/image/info?image=mri2d_1941",
         {"data": {"info": json.dumps({"ts": "x"})}}, 400, "ts"),
        ("a zipped series sent to the datastore", "put", "/datastore/image?image=zipped",
         {"files": {"file": ("series.zip", b"PK\x05\x06" + bytes(18))}}, 400, "archived DICOM series"),
        ("a yes/no field that is neither", "post", "/infer/saliency_gradcam?image=mri2d_1941",
         {"data": {"params": json.dumps({"with_regions": "maybe"})}}, 400, "with_regions"),
        ("a label tag naming a patient", "put", "/datastore/label?image=mri2d_1941&tag=Smith_John_19700101",
         {"files": {"label": ("m.png", _mask_of("1941").read_bytes())}, "data": {"params": "{}"}}, 400, "label tag"),
        ("a picture saved as a label", "put", "/datastore/label?image=mri2d_1941&tag=final",
         {"files": {"label": ("l.png", (studies / "mri2d_1941.jpg").read_bytes())}, "data": {"params": "{}"}},
         400, "distinct values"),
        ("a volume's heatmap as PNG", "post", "/infer/saliency_gradcampp?image=brats_t1c_0001&output=image",
         {"data": {"params": json.dumps({"heatmap": True, "result_extension": ".png"})}}, 400, "PNG label"),
    ]
    if shutil.which("nvidia-smi") is None:
        cases.append(("GPU log without a GPU", "get", "/logs/gpu", {}, 404, "no NVIDIA GPU"))
    for what, method, path, kwargs, code, needle in cases:
        r = getattr(requests, method)(url + path, timeout=120, **kwargs)
        assert r.status_code == code and needle in r.json()["detail"], (what, r.status_code, r.text[:300])
    alive(client)
    assert studies_snapshot(studies) == before
    # 3D Slicer's module: an id like a node name, a label saved with its segment list and no class_name
    # (the class comes from the one class-named segment painted), and a download name it can parse
    sid = "3: T2 FLAIR"
    client.upload_image(str(other), image_id=sid, params={})
    r = requests.get(f"{url}/datastore/image", params={"image": sid}, timeout=60)
    assert r.status_code == 200 and f'filename="{sid}.jpg"' in r.headers["content-disposition"]
    painted = tmp_path / "painted.png"
    seg = np.zeros(np.asarray(Image.open(other)).shape[:2], np.uint8)
    seg[60:90, 60:90] = 2
    Image.fromarray(seg).save(painted)
    segments = [{"name": n, "idx": i} for i, n in enumerate(client.info()["labels"], start=1)]
    assert segments[0]["name"] == "glioma" and segments[1]["name"] == "meningioma"
    # two class segments painted: which class would train is not the annotator's to guess (it was kept by chance)
    both = seg.copy()
    both[10:20, 10:20] = 1
    Image.fromarray(both).save(tmp_path / "both.png")
    with pytest.raises(MONAILabelClientException) as ei:
        client.save_label(sid, str(tmp_path / "both.png"), tag="final", params={"label_info": segments})
    assert status_of(ei.value) == 400 and "glioma, meningioma" in str(ei.value.msg)
    assert "final" not in client.datastore()["objects"][sid]["labels"]
    client.save_label(sid, str(painted), tag="final", params={"label_info": segments})
    assert client.datastore()["objects"][sid]["labels"]["final"]["info"]["class_name"] == "meningioma"
    r = requests.put(f"{url}/datastore/image/info", params={"image": sid}, data={"info": '{"strategy": "x"}'}, timeout=30)
    assert r.status_code == 400 and "strategy" in r.json()["detail"]
    # a deleted image is gone from the listing at once (not when the folder watcher catches up)
    assert requests.delete(f"{url}/datastore/image", params={"id": sid}, timeout=60).status_code == 200
    assert sid not in client.datastore()["objects"]
    assert not list(studies.glob("3*")) and not list(studies.glob("labels/final/3*"))
    # refused uploads leave nothing in the temporary folder (MONAI Label removes them only on success)
    before_tmp = set(glob.glob(os.path.join(tempfile.gettempdir(), "tmp*")))
    with pytest.raises(MONAILabelClientException):
        client.upload_image(str(other), image_id="mri2d_1941", params={})
    requests.post(f"{url}/infer/classification", files={"file": ("", b"not an image at all")}, timeout=60)
    time.sleep(0.5)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "tmp*"))) - before_tmp == set()


# ---- load ----------------------------------------------------------------------------------------

def test_concurrent_requests_run_in_parallel_with_the_same_answers(server, tmp_path):
    """Infer requests are served from worker threads: /info/ answers while a volume is being
    classified, and saliency maps computed concurrently equal the ones computed one at a time
    (the Grad-CAM hooks of one request never see another request's activations)."""
    from PIL import Image

    ids = ["mri2d_1941", "mri2d_0102", "mri2d_1064", "mri2d_3187"]
    params = {"heatmap": True, "with_regions": False}

    def heatmap(k: int) -> np.ndarray:
        c = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        out, _ = c.infer("saliency_gradcam", ids[k], dict(params))
        arr = np.asarray(Image.open(out)).astype(float)
        os.unlink(out)
        return arr

    one_by_one = [heatmap(k) for k in range(4)]
    together: list = [None] * 4
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, heatmap(k))) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for k in range(4):
        assert together[k] is not None, f"concurrent request {k} failed"
        assert np.abs(together[k] - one_by_one[k]).max() <= 1, f"{ids[k]}: map changed under concurrency"

    slow = threading.Thread(target=lambda: MONAILabelClient(server.url, tmpdir=str(tmp_path)).infer(
        "classification", "brats_t1c_0001", {}))
    slow.start()
    time.sleep(0.3)
    answered_during = []
    while slow.is_alive():
        MONAILabelClient(server.url).info()
        answered_during.append(slow.is_alive())
    slow.join()
    assert any(answered_during), "/info/ waited for the running inference (event loop blocked)"


def test_concurrent_clients_no_errors_bounded_memory(server, tmp_path):
    """4 clients send infer requests for a bounded time (TUMORLENS_LOAD_SECONDS, default 45 s)."""
    ids = ["mri2d_1941", "mri2d_0102", "mri2d_1064", "mri2d_3187"]
    errors: list[str] = []
    done = [0] * 4
    stop = time.time() + LOAD_SECONDS
    rss: list[int] = []

    def worker(k: int) -> None:
        c = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        i = 0
        while time.time() < stop:
            model = ("classification", "segmentation")[i % 2]
            try:
                out, _ = c.infer(model, ids[(k + i) % 4], {})
                if out:
                    os.unlink(out)
                done[k] += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append(f"{type(e).__name__}: {e}")
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(server.rss_bytes())
        time.sleep(1.0)
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert sum(done) >= 20 and min(done) >= 3, done
    third = max(len(rss) // 3, 1)
    early, late = np.median(rss[third:2 * third] or rss), np.median(rss[-third:])
    assert late - early < 200 * 1024 * 1024 and late < early * 1.15, (early / 2**20, late / 2**20)


# ---- active learning -----------------------------------------------------------------------------

def test_next_sample_each_strategy(client, server, studies, base_model, tmp_path):
    from tumorlens.activelearning import image_uncertainty
    from tumorlens.data import read_image

    labelled = {"mri2d_1941"}
    r = client.save_label("mri2d_1941", str(_mask_of("1941")), tag="final", params={"class_name": "glioma"})
    assert r["label"] == "mri2d_1941"
    # a prediction asked to be saved with an empty tag (MONAI Label's word for final) does not replace it
    kept = (studies / "labels" / "final" / "mri2d_1941.png").read_bytes()
    r = requests.post(f"{server.url}/infer/segmentation", params={"image": "mri2d_1941"},
                      data={"params": json.dumps({"save_label": True, "label_tag": ""})}, timeout=120)
    assert r.status_code == 409 and "already has a final label" in r.text, r.text[:300]
    assert (studies / "labels" / "final" / "mri2d_1941.png").read_bytes() == kept
    objects = client.datastore()["objects"]
    unl = {i for i, o in objects.items() if "final" not in o["labels"]}
    assert labelled.isdisjoint(unl)
    rnd = client.next_sample("random", {})
    assert rnd["id"] in unl and rnd["held"] == 0
    first = client.next_sample("uncertainty", {})  # scores at most 8 missing images on the spot
    assert first["id"] in unl and first["scored"] == min(len(unl), 8) and len(unl) <= 16
    # annotators asking one after another are not handed an image another one has just been given
    # (MONAI Label's record of each pick, as its own Epistemic strategy reads it)
    assert first["id"] != rnd["id"]
    unc = client.next_sample("uncertainty", {})  # the rest now; the first ones come from the store
    assert unc["id"] in unl - {rnd["id"], first["id"]} and unc["scored"] == len(unl) and unc["held"] == 2
    # the pick is the image of highest entropy among those not handed out, and the score is the core's own number
    ref = image_uncertainty(base_model, read_image(unc["path"]))
    assert abs(ref["entropy_normalised"] - unc["score"]) < 1e-3
    scores = json.loads((studies / ".tumorlens" / "scores.json").read_text())
    best = max(unl - {rnd["id"], first["id"]}, key=lambda k: scores[k]["uncertainty"]["value"])
    assert best == unc["id"]
    # with no hold, the highest entropy of all (as before any pick)
    top = client.next_sample("uncertainty", {"hold_seconds": 0})
    assert top["id"] == max(unl, key=lambda k: scores[k]["uncertainty"]["value"]) and top["held"] == 0
    dis = client.next_sample("saliency_disagreement", {})
    assert dis["id"] in unl - {rnd["id"], first["id"], unc["id"], top["id"]}
    assert 0.0 <= dis["score"] <= 1.0 and dis["score_kind"] == "saliency_disagreement"
    # MONAI Label's own record of the picks stays a record (a strategy name here clashed with it)
    again = client.next_sample("random", {"seed": 1, "hold_seconds": 0})
    again = client.next_sample("random", {"seed": 1, "hold_seconds": 0})  # the same image: now it has a record
    assert isinstance(again.get("strategy"), dict) and "random" in again["strategy"]
    # when every candidate has been handed out lately, the one handed out longest ago comes back
    served = [client.next_sample("random", {})["id"] for _ in range(len(unl))]
    assert set(served) <= unl
    info = client.datastore()["objects"]
    stamps = {i: max(v["ts"] for v in info[i]["image"]["info"]["strategy"].values()) for i in unl}
    oldest = min(stamps.values())
    assert client.next_sample("random", {})["id"] in {i for i, t in stamps.items() if t == oldest}
    # a final label that names no class (a mask alone, as 3D Slicer saves its "tumor" segment) cannot train the
    # classifier: the image stays a candidate for its class, but only once no image lacks a label (it was
    # handed straight back to the annotator who had just saved it; see test_classless_labels_come_last)
    from PIL import Image

    zero = tmp_path / "classless.png"
    Image.fromarray(np.zeros(Image.open(studies / "mri2d_3300.jpg").size[::-1], np.uint8)).save(zero)
    client.save_label("mri2d_3300", str(zero), tag="final", params={})
    objects = client.datastore()["objects"]
    unlabelled = {i for i, o in objects.items() if "final" not in o["labels"]}
    assert unlabelled and "mri2d_3300" not in unlabelled
    picks = [client.next_sample("random", {"seed": k, "hold_seconds": 0}) for k in range(8)]
    assert {p["id"] for p in picks} <= unlabelled and {p["needs"] for p in picks} == {"label"}
    assert {p["candidates"] for p in picks} == {len(unlabelled)}
    r = requests.put(f"{server.url}/datastore/label/info", params={"label": "mri2d_3300", "tag": "final"},
                     data={"info": json.dumps({"class_name": "no_tumor"})}, timeout=30)
    assert r.status_code == 200, r.text
    assert client.next_sample("random", {"hold_seconds": 0})["candidates"] == len(unlabelled)


def _mask_of(index: str) -> Path:
    from tumorlens.paths import shared_data_dir

    return shared_data_dir() / "brain-mri-2d" / "masks" / f"{index}.png"


# ---- the relabel loop: pick, infer, correct, save, train, new version --------------------------------

@pytest.mark.slow
def test_relabel_loop_trains_new_version_without_breaking_inference(client, server, studies, dev2d):
    from PIL import Image

    info0 = client.info()
    v0 = info0["model_version"]
    _, before = infer_json(client, "classification", "mri2d_0102")
    # the shipped model's answer for a tumour slice carries the lesion-window classifier's opinion
    assert before["window_classifier_stored"] is True and before["label"] == "meningioma"
    assert set(before["window_classifier"]["probabilities"]) == {"glioma", "meningioma", "pituitary"}
    # pick the most uncertain tumour slice, take the model's mask, "correct" it with the expert mask
    pick = client.next_sample("uncertainty", {})["id"]
    out, seg = infer_json(client, "segmentation", pick)
    truth = dict(row.split(",")[:2] for row in (sample_studies_dir().parent / "labels.csv").read_text().splitlines()[1:])
    if pick.startswith("mri2d_") and truth[pick] != "no_tumor":
        label_file = str(_mask_of(pick.split("_")[1]))
    elif pick.startswith("mri2d_"):
        label_file = str(Path(out).with_suffix(".zero.png"))
        Image.fromarray(np.zeros_like(np.asarray(Image.open(out)))).save(label_file)
    else:
        label_file = out  # a volume: accept the model's mask as the annotation
    client.save_label(pick, label_file, tag="final", params={"class_name": truth.get(pick, "glioma")})
    # a class typed by hand in another spelling is stored as the model's own name
    client.save_label("mri2d_0102", str(_mask_of("0102")), tag="final", params={"class_name": "Meningioma"})
    assert client.datastore()["objects"]["mri2d_0102"]["labels"]["final"]["info"]["class_name"] == "meningioma"
    labelled = {i for i, o in client.datastore()["objects"].items() if "final" in o["labels"]}
    task = client.train_start("tumorlens", {"max_epochs": 1})
    assert task["status"] in ("SUBMITTED", "RUNNING")
    # inference keeps answering (with the old version) while training runs
    served, t0 = 0, time.time()
    while time.time() - t0 < 240:
        _, r = infer_json(client, "classification", "mri2d_1064")
        served += 1
        st = client.train_status()
        if st.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(0.5)
    assert st["status"] == "DONE", list(st.get("details", []))[-10:]
    assert served >= 1
    info1 = client.info()
    stats = info1["train_stats"]["tumorlens"]
    assert stats["status"] == "DONE" and stats["from_version"] == v0
    assert info1["model_version"] == stats["version"] != v0 and stats["version"] in info1["model_versions"]
    assert stats["items"] == len(labelled) and stats["epochs"][0]["samples"] >= len(labelled)
    _, after = infer_json(client, "classification", "mri2d_0102")
    assert after["model"]["version"] == stats["version"]
    # the encoder stayed frozen, so the text-aligned decision and the familiarity check carry over
    assert stats["heads_carried"] == ["alignment.pt", "text_probe.pt"]
    assert after["decision"] == "aligned" and after["familiarity"]["familiar"] in (True, False)
    diff = max(abs(after["probabilities"][c] - before["probabilities"][c]) for c in CLASS_NAMES)
    assert diff > 1e-6  # the weights really changed
    # labelled images leave the candidate pool; scores are recomputed under the new version
    nxt = client.next_sample("uncertainty", {})
    assert nxt["id"] not in {pick, "mri2d_0102", "mri2d_1941"} and nxt["model_version"] == stats["version"]
    card = json.loads((studies / ".tumorlens" / "models" / stats["version"] / "model_card.json").read_text())
    assert card["parent_version"] == v0 and card["finetune"]["items"] == stats["items"]
    # the lesion refiner (independent of the fine-tuned weights) goes along to the new version
    assert stats["refiner_carried"] is True and card["finetune"]["refiner_carried"] is True
    assert (studies / ".tumorlens" / "models" / stats["version"] / "refiner.pt").is_file()
    # the lesion-window classifier and the layer statistics read what the frozen encoder leaves unchanged: they go
    # along (dropping the window classifier had cost 4.5 points of accuracy, an outside probe, session 40)
    folder = studies / ".tumorlens" / "models" / stats["version"]
    assert (folder / "window_classifier.pt").is_file() and (folder / "layer_statistics.pt").is_file()
    assert stats["window_classifier_carried"] is True and card["finetune"]["window_classifier_carried"] is True
    assert not any("lesion-window classifier was not carried over" in n for n in stats["notes"])
    assert after["window_classifier_stored"] is True and "layer_score" in after["familiarity"]
    # the scoring method (MONAI Label runs it as a subprocess) scores every unlabelled image anew
    r = requests.post(f"{server.url}/scoring/uncertainty", params={"run_sync": "true"}, timeout=600)
    assert r.status_code == 200, r.text
    scores = json.loads((studies / ".tumorlens" / "scores.json").read_text())
    objects = client.datastore()["objects"]
    unl = [i for i, o in objects.items() if "final" not in o["labels"]]
    assert unl and all(scores[i]["uncertainty"]["model_version"] == stats["version"] for i in unl)
    # and each image's info gives them over REST (a client had to scrape the run's log line; session 39 probe)
    shown = requests.get(f"{server.url}/datastore/image/info", params={"image": unl[0]}, timeout=30).json()
    assert shown["scores"]["uncertainty"] == {k: scores[unl[0]]["uncertainty"][k] for k in ("value", "model_version")}
    assert "scores" not in client.datastore()["objects"][unl[0]]["image"]["info"]  # shown, never stored
    # a run stopped with DELETE /train/ is reported stopped (not running forever) and publishes nothing
    client.train_start("tumorlens", {"max_epochs": 50})
    # from the start, the progress 3D Slicer's MONAILabel module shows (epoch / total_epochs): without
    # them it read 1 / 1, a finished run, while this one was loading
    first = client.info()["train_stats"]["tumorlens"]
    assert first["status"] in ("STARTING", "RUNNING") and first["epoch"] == 0 and first["total_epochs"] == 50
    t0 = time.time()
    while client.info()["train_stats"]["tumorlens"].get("status") != "RUNNING" and time.time() - t0 < 180:
        time.sleep(1)
    assert client.info()["train_stats"]["tumorlens"]["status"] == "RUNNING"
    assert requests.delete(f"{server.url}/train/", timeout=60).status_code == 200
    t0 = time.time()
    while client.info()["train_stats"]["tumorlens"]["status"] == "RUNNING" and time.time() - t0 < 30:
        time.sleep(0.5)
    info2 = client.info()
    assert info2["train_stats"]["tumorlens"]["status"] == "STOPPED"
    assert info2["model_version"] == stats["version"]
    # stopped before its process wrote anything: STOPPED at once, not STARTING for the start grace
    client.train_start("tumorlens", {"max_epochs": 50})
    t0 = time.time()  # MONAI Label starts the process from a worker thread: wait until it exists
    while client.train_status().get("status") != "RUNNING" and time.time() - t0 < 30:
        time.sleep(0.1)
    assert requests.delete(f"{server.url}/train/", timeout=60).status_code == 200
    assert client.info()["train_stats"]["tumorlens"]["status"] == "STOPPED"


def test_batch_inference_on_cpu_keeps_final_labels(client, server, studies):
    """``POST /batch/infer/{model}`` (MONAI Label's defaults ask for CUDA devices, of which this machine
    has none) writes the model's masks under ``original`` for every image; a run that asks for the
    ``final`` tag skips images whose annotators' labels it would replace."""
    client.save_label("mri2d_2301", str(_mask_of("2301")), tag="final", params={})
    finals = {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()}
    r = requests.post(f"{server.url}/batch/infer/segmentation", params={"images": "labeled", "run_sync": "true"},
                      json={"label_tag": "final"}, timeout=600)
    assert r.status_code == 200, r.text[-500:]
    res = r.json()
    assert "mri2d_2301" in res and all("already has a final label" in v["skipped"] for v in res.values())
    assert {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()} == finals
    r = requests.post(f"{server.url}/batch/infer/segmentation", params={"run_sync": "true"}, timeout=600)
    assert r.status_code == 200, r.text[-500:]
    objects = client.datastore()["objects"]
    assert set(r.json()) == set(objects) and all(v.get("tag") == "original" for v in r.json().values())
    assert all("original" in o["labels"] for o in objects.values())
    assert {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()} == finals
    # the labelled cases as one archive, and the checkpoint the tasks run now (MONAI Label's /model)
    r = requests.get(f"{server.url}/datastore/dataset", timeout=120)
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert "label/mri2d_2301.png" in names and "image/mri2d_2301.jpg" in names
    version = client.info()["model_version"]
    current = studies / ".tumorlens" / "models" / version / "checkpoint.pt"
    if version.startswith("base:"):
        from tumorlens.models.registry import resolve

        current = resolve(None) / "checkpoint.pt"
    r = requests.get(f"{server.url}/model/segmentation", timeout=120)
    assert r.status_code == 200 and r.content == current.read_bytes()
    # a checkpoint is bytes, not the SNES page table the system's mime.types names for ".pt"
    assert r.headers["content-type"] == "application/octet-stream", r.headers["content-type"]
    alive(client)


def test_segment_names_that_name_the_patient_are_refused_and_a_class_is_not_dropped(client, server, studies, dev2d):
    """An outside probe submitted a label whose segment was named 'Smith_John_19700101' (refused as an image id,
    stored as a segment name and listed to every client); and a corrected mask submitted without its class (as
    Slicer's submit sends it unless the class is chosen again) silently dropped the class given before."""
    src = Path(dev2d) / "images" / "1941.jpg"  # a glioma (its class in the test of the strategies above)
    client.upload_image(str(src), image_id="names_probe", params={})
    mask, cls = _mask_of("1941"), "glioma"
    try:
        for info in ({"label_names": {"Smith_John_19700101": 1}, "class_name": "glioma"},
                     {"label_info": [{"name": "Mr Smith lesion", "idx": 1}], "class_name": "glioma"}):
            with pytest.raises(MONAILabelClientException) as e:
                client.save_label("names_probe", str(mask), tag="final", params=info)
            assert status_of(e.value) == 400 and "segment name" in e.value.msg
        assert "final" not in client.datastore()["objects"]["names_probe"]["labels"]
        client.save_label("names_probe", str(mask), tag="final", params={"label_names": {"tumour": 1}, "class_name": cls})
        r = requests.put(f"{server.url}/datastore/label/info", params={"label": "names_probe", "tag": "final"},
                         data={"info": json.dumps({"label_names": {"Smith_John_19700101": 1}})}, timeout=30)
        assert r.status_code == 400 and "segment name" in r.text, r.text
        assert b"Smith" not in (studies / "datastore_v2.json").read_bytes()
        # the corrected mask sent again without its class keeps the class
        client.save_label("names_probe", str(mask), tag="final", params={"label_names": {"tumour": 1}})
        assert client.datastore()["objects"]["names_probe"]["labels"]["final"]["info"]["class_name"] == cls
    finally:
        requests.delete(f"{server.url}/datastore/image", params={"id": "names_probe"}, timeout=30)
    alive(client)


def test_an_image_no_model_can_read_is_not_handed_to_annotators(client, server, tmp_path):
    """An all-zero volume uploaded from Slicer (every model answers it with a 400, 'image is constant') was
    handed out by the random strategy again and again; its failed scoring was retried on every request."""
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.eye(4)), str(blank))
    client.upload_image(str(blank), image_id="blank_probe", params={})
    try:
        with pytest.raises(MONAILabelClientException) as e:
            infer_json(client, "classification", "blank_probe")
        assert status_of(e.value) == 400
        # the refusal is recorded at once: the random strategy had handed it back until a scoring run met it
        # (session 39 probe)
        picks = {client.next_sample("random", {"hold_seconds": 0, "seed": s})["id"] for s in range(30)}
        assert "blank_probe" not in picks
        assert client.next_sample("random", {"hold_seconds": 0})["unusable"] == 1
        pick = client.next_sample("uncertainty", {"hold_seconds": 0, "max_compute": 64})
        assert pick["id"] != "blank_probe" and pick["unusable"] == 1
    finally:
        requests.delete(f"{server.url}/datastore/image", params={"id": "blank_probe"}, timeout=30)
    alive(client)


def test_a_second_server_on_the_same_folder_is_refused(server, studies, client):
    """A second ``tumorlens serve`` on the same studies folder started without a word, and each server's label
    saves erased the other's from the index (an outside probe, session 40). It now stops at start, saying why;
    the first one keeps serving."""
    env = dict(SERVER_ENV, MONAI_LABEL_SESSION_PATH=str(studies.parent / "sessions2"))
    # the same folder, and the same folder given another state folder (a probe's second way in)
    for n, extra in enumerate(({}, {"TUMORLENS_STATE_DIR": str(studies.parent / "other-state")})):
        second = ServerProcess(studies, env={**env, **extra}, log_path=studies.parent / f"server2-{n}.log", via_cli=True)
        try:
            with pytest.raises(RuntimeError, match="already served"):
                second.start(timeout=300)
        finally:
            second.stop()
    alive(client)
