"""Edge geometries of volumes: singleton spatial axes (NIfTI 4D storage, single coronal/sagittal
slices), masks stored with another axis order than their image, how the server reports and stops, and a
studies folder whose images lie in subfolders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import wait_until_answering
from monai.data import MetaTensor

from tumorlens.data import read_image
from tumorlens.errors import InvalidInputError
from tumorlens.inference import display_to_volume, volume_to_display
from tumorlens.paths import project_root

# anisotropic, with distinct spacings per axis: dropping or shifting an axis changes the geometry visibly
AFFINE = np.array([[0.5, 0, 0, -40.0], [0, 6.0, 0, 10.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


def _save(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


# ---- 1. NIfTI 4D storage with a singleton spatial axis ------------------------------------------

@pytest.mark.parametrize("shape3", [(64, 1, 48), (1, 64, 48), (64, 48, 1)])
def test_4d_nifti_with_singleton_spatial_axis_keeps_its_geometry(tmp_path, shape3):
    """(x, 1, z, 1) must read exactly as the 3D (x, 1, z) file: squeezing the spatial 1 as well moved
    every voxel under the file's affine (and applied the 6 mm spacing to the wrong axis)."""
    sl = np.random.RandomState(0).rand(*shape3).astype(np.float32)
    a3 = read_image(_save(tmp_path / "s3.nii.gz", sl, AFFINE))
    a4 = read_image(_save(tmp_path / "s4.nii.gz", sl[..., None], AFFINE))
    a5 = read_image(_save(tmp_path / "s5.nii.gz", sl[..., None, None], AFFINE))
    for im in (a3, a4, a5):
        assert tuple(im.shape[1:]) == shape3
        np.testing.assert_allclose(np.asarray(im.affine), AFFINE)
        np.testing.assert_allclose(im.meta["spacing"], [0.5, 6.0, 2.0])
        np.testing.assert_array_equal(im.numpy()[0], sl)


def test_4d_nifti_with_several_volumes_is_refused(tmp_path):
    """Three volumes of one slice are not a three-slice volume (a squeeze made them one)."""
    p = _save(tmp_path / "t3.nii.gz", np.random.RandomState(1).rand(20, 16, 1, 3).astype(np.float32), AFFINE)
    with pytest.raises(InvalidInputError, match="t3.nii.gz.*3 volumes"):
        read_image(p)


# ---- 2. a single coronal / sagittal slice is one picture in its own plane -----------------------

def _slice(dev2d: Path, dev_rows: list[dict]) -> np.ndarray:
    from PIL import Image

    row = next(r for r in dev_rows if r["mask"] and r["label"] != "no_tumor")
    return np.asarray(Image.open(dev2d / row["image"]).convert("L"), dtype=np.float32)


@pytest.mark.parametrize("shape", [(30, 1, 20), (1, 30, 20), (30, 20, 1), (1, 1, 5)])
def test_display_round_trip_of_one_slice_volumes(shape):
    rng = np.random.RandomState(2)
    vol = rng.rand(*shape).astype(np.float32)
    # stored LPI-like (x and z flipped, y/z swapped for some): the display comes from the affine
    for aff in (np.eye(4), np.diag([-1.0, 1.0, -1.0, 1.0]), np.array([[0, 1.0, 0, 0], [-1.0, 0, 0, 0],
                                                                     [0, 0, 1.0, 0], [0, 0, 0, 1]])):
        disp, back = volume_to_display(vol, aff)
        np.testing.assert_array_equal(display_to_volume(disp, back), vol)
    disp, back = volume_to_display(vol, np.eye(4))
    if shape in ((30, 1, 20), (1, 30, 20)):  # one picture, superior on top
        assert disp.shape == (1, 20, 30)
        assert back["plane"] == ("coronal" if shape[1] == 1 else "sagittal")


def test_single_coronal_and_sagittal_slices_predict_like_the_axial_one(predictor, dev2d, dev_rows, tmp_path):
    """The same picture stored as an axial (x, y, 1), a coronal (x, 1, z), a sagittal (1, y, z) slice or
    a coronal slice stored x-flipped with a matching affine is one image to the network: the same
    probabilities, and a mask on each input's own grid showing the same pixels. (A coronal slice used to
    be cut into 1-pixel axial strips, each stretched to the network's square input.)"""
    pic = _slice(dev2d, dev_rows)  # rows x cols as displayed
    ras = np.ascontiguousarray(pic[::-1, ::-1].T)  # display (row, col) -> RAS (x, y): radiological order
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = ras.shape[0] - 1
    files = {
        "axial": _save(tmp_path / "axial.nii.gz", ras[:, :, None], np.eye(4)),
        "coronal": _save(tmp_path / "coronal.nii.gz", ras[:, None, :], np.eye(4)),
        "sagittal": _save(tmp_path / "sagittal.nii.gz", ras[None, :, :], np.eye(4)),
        "coronal_las": _save(tmp_path / "coronal_las.nii.gz", ras[::-1, None, :].copy(), flip),
    }
    preds = {k: predictor.predict(read_image(p)) for k, p in files.items()}
    ref = preds["axial"]
    assert ref.mask.numpy().any(), "the tumour slice should give a mask to compare"
    for k, p in preds.items():
        for c, v in ref.probabilities.items():
            assert abs(p.probabilities[c] - v) < 1e-5, (k, c, p.probabilities, ref.probabilities)
        assert tuple(p.mask.shape) == tuple(read_image(files[k]).shape), k
        assert p.extra["caveats"] == [], (k, p.extra["caveats"])  # a slice, not a volume classified slice by slice
        np.testing.assert_allclose(np.asarray(p.mask.affine), np.asarray(read_image(files[k]).affine))
    m = ref.mask.numpy()[0, :, :, 0]
    np.testing.assert_array_equal(preds["coronal"].mask.numpy()[0, :, 0, :], m)
    np.testing.assert_array_equal(preds["sagittal"].mask.numpy()[0, 0], m)
    np.testing.assert_array_equal(preds["coronal_las"].mask.numpy()[0, ::-1, 0, :], m)



def test_a_volume_with_a_wide_empty_border_is_seen_like_the_tight_one(predictor, brats):
    """The same BraTS volume with a 100-voxel empty margin in x and y: its slices are framed around
    the head as training slices are (one frame for the whole volume). Without the frame the padded
    copy's mask shared 0.4 % with the tight one's and 0.0002 Dice with the expert label. The two are not
    pixel-identical inputs: the tight volume's head fills >= FRAME_BELOW of its slices, so it is read as it
    is, while the padded one is re-framed to FRAME_FILL; the tumour call and the mask must agree, not the
    tumour type of this skull-stripped volume, which the shipped model reads as a near tie (glioma 0.47,
    meningioma 0.40; the padded copy 0.28 / 0.60)."""
    from tumorlens.data import read_mask

    img = read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    arr = img[0].numpy()
    pad = np.pad(arr, ((100, 100), (100, 100), (0, 0)), constant_values=float(arr.min()))
    aff = img.affine.clone()
    aff[:3, 3] -= aff[:3, :3] @ torch.tensor([100.0, 100.0, 0.0], dtype=aff.dtype)
    tight = predictor.predict(img)
    wide = predictor.predict(MetaTensor(torch.from_numpy(pad)[None], affine=aff))
    assert wide.label != "no_tumor" and tight.label != "no_tumor"
    assert abs(wide.probabilities["no_tumor"] - tight.probabilities["no_tumor"]) < 0.1  # measured 0.08 vs 0.13
    m0, m1 = tight.mask[0].numpy() > 0, wide.mask[0].numpy()[100:-100, 100:-100] > 0
    assert wide.mask.shape == (1, *pad.shape) and not wide.mask[0].numpy()[:100].any()
    assert 2 * (m0 & m1).sum() / (m0.sum() + m1.sum()) > 0.2  # measured 0.60 (cycle 12: 0.30; unframed: 0.004)
    truth = read_mask(brats / "pat0001" / "OTMultiClass.nii.gz", like=img)[0].numpy() > 0
    dice = 2 * (truth & m1).sum() / (truth.sum() + m1.sum())
    assert dice > 0.5 * 2 * (truth & m0).sum() / (truth.sum() + m0.sum())  # measured 0.189 vs 0.223 (cycle 12: 0.079 vs 0.068)

# ---- 3. locate: a mask stored with another axis order -------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """ICBM152 (nilearn, offline) with a lesion planted in the right putamen, saved as NIfTI with its
    mask; the same mask stored x-flipped with a matching affine; and its mirror image (data flipped,
    affine kept: a lesion in the left hemisphere)."""
    from tumorlens.atlas.synthetic import make_case

    d = tmp_path_factory.mktemp("planted")
    case = make_case("Right_Putamen", spacing_mm=2.0, radius_mm=6.0)
    aff = np.asarray(case.volume.affine, dtype=float)
    vol = case.volume.numpy()[0].astype(np.float32)
    mask = (case.mask.numpy()[0] > 0).astype(np.uint8)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = vol.shape[0] - 1
    return {
        "image": _save(d / "image.nii.gz", vol, aff),
        "mask": _save(d / "mask.nii.gz", mask, aff),
        "mask_flipx": _save(d / "mask_flipx.nii.gz", mask[::-1].copy(), aff @ flip),
        "mask_mirror": _save(d / "mask_mirror.nii.gz", mask[::-1].copy(), aff),
        "mask_shifted": _save(d / "mask_shifted.nii.gz", mask, aff @ np.array(
            [[1, 0, 0, 3.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
        "array": mask,
    }


def test_mask_with_another_axis_order_is_brought_onto_the_image_grid(planted):
    from tumorlens.atlas.cli import mask_on_image_grid
    from tumorlens.data.readers import read_mask

    img = read_image(planted["image"])
    same = mask_on_image_grid(read_mask(planted["mask"]), img, planted["mask"])
    flipped = mask_on_image_grid(read_mask(planted["mask_flipx"]), img, planted["mask_flipx"])
    mirror = mask_on_image_grid(read_mask(planted["mask_mirror"]), img, planted["mask_mirror"])
    np.testing.assert_array_equal(same.numpy()[0], planted["array"])
    np.testing.assert_array_equal(flipped.numpy()[0], planted["array"])  # the same lesion
    np.testing.assert_allclose(np.asarray(flipped.affine), np.asarray(img.affine))
    np.testing.assert_array_equal(mirror.numpy()[0], planted["array"][::-1])  # another lesion: kept as stored
    with pytest.raises(InvalidInputError, match="mask_shifted.nii.gz.*does not lie on the image's grid"):
        mask_on_image_grid(read_mask(planted["mask_shifted"]), img, planted["mask_shifted"])
    # a mask without geometry (identity affine) is taken in the image's voxel order
    bare = MetaTensor(torch.from_numpy(planted["array"][None]), affine=torch.eye(4))
    on = mask_on_image_grid(bare, img, "bare")
    np.testing.assert_array_equal(on.numpy()[0], planted["array"])
    assert "no geometry" in on.meta["grid_assumed"]  # said in locate's notes, not silently assumed
    assert "grid_assumed" not in same.meta


def test_a_picture_mask_fits_a_2d_dicom_slice_of_its_image(dev2d, tumour_rows, tmp_path):
    """A PNG mask has no geometry; `locate` refused it for a DICOM copy of its slice (0.9 mm pixels) as lying
    'not on the image's grid', though it does on the JPEG. Its rows and columns are the slice's."""
    import SimpleITK as sitk
    from PIL import Image

    from tumorlens.atlas.cli import mask_on_image_grid
    from tumorlens.data.readers import read_mask

    row = tumour_rows[0]
    dcm = sitk.GetImageFromArray(np.asarray(Image.open(dev2d / row["image"]).convert("L"), dtype=np.int16))
    dcm.SetSpacing((0.9, 0.9))
    dcm.SetMetaData("0008|0060", "MR")
    sitk.WriteImage(dcm, str(tmp_path / "slice.dcm"))
    img = read_image(tmp_path / "slice.dcm")
    mask = read_mask(dev2d / row["mask"])
    on = mask_on_image_grid(mask, img, dev2d / row["mask"])
    np.testing.assert_array_equal(on.numpy()[0], mask.numpy()[0])
    assert on.numpy().any()


def test_locate_with_flipped_stored_mask_keeps_the_laterality(planted, tmp_path, capsys):
    """`tumorlens locate` compared shapes only: the x-flipped mask put the right-putamen lesion on the left."""
    from tumorlens.cli import main

    out = tmp_path / "loc.json"
    rc = main(["locate", str(planted["image"]), "--mask", str(planted["mask_flipx"]), "--no-deformable",
               "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["lesion"]["laterality"] == "right"
    assert res["regions"][0]["label"] == "Right_Putamen"
    assert main(["locate", str(planted["image"]), "--mask", str(planted["mask_shifted"])]) == 2
    assert "mask_shifted.nii.gz" in capsys.readouterr().err


# ---- 4. the server's error message names no server path -----------------------------------------

def _app_module(name: str):
    """A module of the MONAI Label app (``monai_app/lib/...``), imported as the server imports it."""
    import importlib

    pytest.importorskip("monailabel")
    sys.path.insert(0, str(project_root() / "monai_app"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_infer_error_names_the_upload_not_the_servers_temp_file(tmp_path):
    """A JPEG renamed .nii: nibabel's message quotes the file's path, on the server a temporary file."""
    public_problem = _app_module("lib.infers.base").public_problem
    fake = tmp_path / "tmpab12cd.nii"
    fake.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 400)  # a JPEG's first bytes
    with pytest.raises(InvalidInputError) as e:
        read_image(fake)
    assert str(fake) in e.value.problem  # what nibabel says, path included
    uploaded = public_problem(e.value, str(fake), {})
    assert str(tmp_path) not in uploaded and "tmpab12cd" not in uploaded and "the uploaded file" in uploaded
    named = public_problem(e.value, str(fake), {"image_id": "case7"})
    assert str(tmp_path) not in named and "case7" in named


# ---- 5. SIGTERM to `tumorlens serve` ends the server -----------------------------------------------

def test_sigterm_to_serve_stops_the_server(tmp_path):
    """Stopping `tumorlens serve` (SIGTERM, what a service manager or `kill` sends) must not leave the
    MONAI Label server (`python -m monailabel.main`) running on its port."""
    pytest.importorskip("monailabel")
    psutil = pytest.importorskip("psutil")
    import shutil

    from tumorlens.paths import sample_studies_dir
    from tumorlens.serving.process import free_port

    studies = tmp_path / "studies"
    studies.mkdir()
    for f in sorted(sample_studies_dir().glob("*.jpg"))[:1]:
        shutil.copy(f, studies / f.name)
    port = free_port()
    env = dict(os.environ, MONAI_LABEL_AUTO_UPDATE_SCORING="false", OMP_WAIT_POLICY="PASSIVE",
               MONAI_LABEL_SESSION_PATH=str(tmp_path / "sessions"))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "tumorlens"), "serve", "--studies", str(studies),
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(tmp_path))

    def servers() -> list:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "monailabel.main" in cmd and str(port) in cmd:
                found.append(p)
        return found

    try:
        wait_until_answering(f"http://127.0.0.1:{port}/info/", proc, tmp_path / "serve.log", 180, "tumorlens serve")
        running = servers()
        assert running, "no monailabel.main process found for the port"
        os.kill(proc.pid, signal.SIGTERM)
        gone, alive = psutil.wait_procs(running, timeout=20)
        assert not alive, [p.pid for p in alive]
        assert proc.wait(timeout=10) is not None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)
        log.close()


def test_serve_keeps_session_uploads_in_its_work_folder(tmp_path, monkeypatch):
    """MONAI Label stores session uploads under ~/.cache/monailabel/sessions unless told otherwise: `tumorlens
    serve --workdir W` puts them in W/sessions, and an explicit MONAI_LABEL_SESSION_PATH still wins."""
    import argparse

    from tumorlens.serving import cli

    seen = []
    monkeypatch.setattr(cli.os, "execvpe", lambda exe, cmd, env: seen.append(env))
    args = argparse.Namespace(studies=None, host="127.0.0.1", port=8999, conf=None, workdir=str(tmp_path / "w"))
    monkeypatch.delenv("MONAI_LABEL_SESSION_PATH", raising=False)
    cli.run(args)
    assert seen[-1]["MONAI_LABEL_SESSION_PATH"] == str(tmp_path / "w" / "sessions")
    assert (tmp_path / "w" / "studies").is_dir()
    monkeypatch.setenv("MONAI_LABEL_SESSION_PATH", str(tmp_path / "mine"))
    cli.run(args)
    assert seen[-1]["MONAI_LABEL_SESSION_PATH"] == str(tmp_path / "mine")


# ---- 6. a studies folder whose images lie in subfolders --------------------------------------------

def test_a_studies_folder_of_class_subfolders_is_not_served_empty_without_a_word(dev2d, dev_rows, tmp_path, caplog):
    """MONAI Label's datastore lists the studies folder's top level only: a Kaggle-style folder (one subfolder
    per class) gave a server with no image and no message. The datastore now logs why and what to do; a flat
    folder lists its images and says nothing."""
    import logging
    import shutil

    TumorlensDatastore = _app_module("lib.datastore").TumorlensDatastore
    nested = tmp_path / "kaggle"
    for i, (folder, row) in enumerate((("glioma", dev_rows[0]), ("notumor", dev_rows[-1]), ("glioma", dev_rows[5]))):
        (nested / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(dev2d / row["image"], nested / folder / f"img{i}.jpg")
    with caplog.at_level(logging.WARNING):
        ds = TumorlensDatastore(str(nested))
    assert ds.list_images() == []
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "3 image files lie in its subfolders: glioma/ (2), notumor/ (1)" in said and "top level only" in said
    caplog.clear()
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(dev2d / dev_rows[0]["image"], flat / "a.jpg")
    with caplog.at_level(logging.WARNING):
        assert len(TumorlensDatastore(str(flat)).list_images()) == 1
    assert "subfolders" not in " ".join(r.getMessage() for r in caplog.records)


def test_what_another_process_saves_to_the_index_is_kept_and_seen(dev2d, dev_rows, tmp_path):
    """A batch inference runs in a subprocess that saves its masks under ``original`` with their info (model,
    version) into the index. The server never re-read it (MONAI Label reloads on a modification, and the index is
    renamed into place) and erased them at its next label save (an outside probe, session 40). Now the server takes
    in what another process saved before it writes, and reloads when a new index is renamed in."""
    import shutil
    from types import SimpleNamespace

    from PIL import Image

    TumorlensDatastore = _app_module("lib.datastore").TumorlensDatastore
    studies = tmp_path / "studies"
    studies.mkdir()
    masks = []
    for i in range(2):
        shutil.copy(dev2d / dev_rows[i]["image"], studies / f"im{i}.jpg")
        size = Image.open(studies / f"im{i}.jpg").size
        masks.append(tmp_path / f"m{i}.png")
        Image.fromarray(np.zeros(size[::-1], np.uint8)).save(masks[-1])
    server = TumorlensDatastore(str(studies), auto_reload=False)
    worker = TumorlensDatastore(str(studies), auto_reload=False)  # the batch-inference subprocess
    worker.save_label("im0", str(masks[0]), "original", {"model": "segmentation", "model_version": "v0007"})
    assert not server.get_label_by_image_id("im0", "original")  # not seen yet
    server.save_label("im1", str(masks[1]), "final", {"class_name": "no_tumor"})
    index = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert index["im0"]["labels"]["original"]["info"]["model_version"] == "v0007", index["im0"]
    assert index["im1"]["labels"]["final"]["info"]["class_name"] == "no_tumor"
    assert server.get_label_info("im0", "original")["model_version"] == "v0007"
    # a label removed here (file and entry) is not brought back from a stale copy
    worker.remove_label("im0", "original")
    server.save_label("im1", str(masks[1]), "final", {"class_name": "no_tumor"})
    assert "original" not in json.loads((studies / "datastore_v2.json").read_text())["objects"]["im0"]["labels"]
    # the watcher's answer to a renamed-in index: the server reads what the other process wrote
    worker.save_label("im0", str(masks[0]), "original", {"model": "segmentation", "model_version": "v0008"})
    server._on_index_replaced(SimpleNamespace(dest_path=server._datastore_config_path))
    assert server.get_label_info("im0", "original")["model_version"] == "v0008"


def test_setting_no_tumour_on_a_drawn_label_is_refused_as_when_it_is_saved(dev2d, dev_rows, tmp_path):
    """``PUT /datastore/label/info`` with ``no_tumor`` on a mask with a tumour drawn was accepted (saving the same
    label is a 400): the image counted as labelled and training skipped it (an outside probe, session 40)."""
    import shutil

    from fastapi import HTTPException
    from PIL import Image

    TumorlensDatastore = _app_module("lib.datastore").TumorlensDatastore
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(dev2d / dev_rows[0]["image"], studies / "im0.jpg")
    w, h = Image.open(studies / "im0.jpg").size
    drawn = np.zeros((h, w), np.uint8)
    drawn[h // 3:h // 2, w // 3:w // 2] = 1
    Image.fromarray(drawn).save(tmp_path / "m.png")
    ds = TumorlensDatastore(str(studies), auto_reload=False)
    ds.save_label("im0", str(tmp_path / "m.png"), "final", {"class_name": "glioma"})
    with pytest.raises(HTTPException) as e:
        ds.update_label_info("im0", "final", {"class_name": "no_tumor"})
    assert e.value.status_code == 400 and "outlines" in e.value.detail
    assert ds.get_label_info("im0", "final")["class_name"] == "glioma"
    ds.update_label_info("im0", "final", {"class_name": "meningioma"})
    assert ds.get_label_info("im0", "final")["class_name"] == "meningioma"


def test_the_folder_watcher_survives_a_request_changing_the_index(dev2d, dev_rows, tmp_path, monkeypatch):
    """MONAI Label's folder watcher died for good ("dictionary changed size during iteration") when a request
    changed the index while it checked for removed files: files added to the studies folder afterwards were
    never seen. The check is tried again, and the datastore's own writes replace the index instead of changing
    it in place."""
    import shutil

    from monailabel.datastore.local import LocalDatastore

    TumorlensDatastore = _app_module("lib.datastore").TumorlensDatastore
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(dev2d / dev_rows[0]["image"], studies / "a.jpg")
    ds = TumorlensDatastore(str(studies), auto_reload=False)
    real, calls = LocalDatastore._remove_non_existing, []

    def racing(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return real(self)

    monkeypatch.setattr(LocalDatastore, "_remove_non_existing", racing)
    assert ds._remove_non_existing() == 0 and len(calls) == 2
    before = ds._datastore.objects
    shutil.copy(dev2d / dev_rows[1]["image"], studies / "b.jpg")
    ds.add_image("c", str(dev2d / dev_rows[2]["image"]), {})
    assert ds._datastore.objects is not before and "c" in ds._datastore.objects and "c" not in before
    ds.refresh()
    assert {"a", "b", "c"} <= set(ds.list_images())


def test_classless_labels_come_last(monkeypatch):
    """The strategies' candidates: images without a final label first; a final label that names no class
    only when none is left (an annotator who saved a mask in 3D Slicer's "tumor" segment was handed the
    same image straight back)."""
    strategies = _app_module("lib.activelearning.strategies")
    monkeypatch.setattr(strategies, "usable", lambda state, ds, ids: ([i for i in ids if i != "broken"],
                                                                      int("broken" in ids)))
    gaps = {"a": "class_name", "b": "label", "c": "label", "d": "class_name"}
    assert strategies.candidates(None, None, gaps) == (["b", "c"], 0)
    assert strategies.candidates(None, None, {"a": "class_name", "d": "class_name"}) == (["a", "d"], 0)
    # unlabelled images that no model can read do not hold the classless ones back
    assert strategies.candidates(None, None, {"broken": "label", "a": "class_name"}) == (["a"], 1)
    # scored candidates: the images the model was trained for first (a torso phantom was the least certain of all)
    scores = {"brain": {"value": 0.4}, "torso": {"value": 0.9, "out_of_scope": ["no pose matches ..."]},
              "crop": {"value": 0.7}}
    assert max(scores, key=lambda k: strategies.rank(scores[k], k)) == "crop"
    assert max(["torso"], key=lambda k: strategies.rank(scores[k], k)) == "torso"


def test_stored_labels_survive_missing_files_failed_writes_and_a_damaged_index(dev2d, tumour_rows, tmp_path,
                                                                                 monkeypatch):
    """What an outside probe lost by killing and starving the server (session 34):
    - a label file moved out of the folder for a moment came back with no class and no annotator (the watcher
      dropped its entry and re-added the file as new): the info is kept aside and given back;
    - a save whose index write failed (full disk) had already replaced the label file: all or nothing now, with a
      507 that says why, and the earlier label is kept in the label history when a save succeeds;
    - a damaged index stopped the server at start: it is set aside and the second copy takes its place."""
    import errno
    import json
    import shutil

    from fastapi import HTTPException

    mod = _app_module("lib.datastore")
    studies = tmp_path / "studies"
    studies.mkdir()
    rows = [r for r in tumour_rows if r["label"] == "glioma"][:2]
    shutil.copy(dev2d / rows[0]["image"], studies / "a.jpg")
    ds = mod.TumorlensDatastore(str(studies), auto_reload=False)
    mask_a, mask_b = dev2d / rows[0]["mask"], tmp_path / "b.png"
    from PIL import Image

    Image.fromarray(np.asarray(Image.open(mask_a))[::-1].copy()).save(mask_b)
    ds.save_label("a", str(mask_a), "final", {"class_name": "glioma", "client_id": "ann1"})
    label = studies / "labels" / "final" / "a.png"
    first = label.read_bytes()

    # a label file away for a moment
    shutil.move(label, tmp_path / "away.png")
    ds.refresh()
    assert "final" not in ds._datastore.objects["a"].labels
    shutil.move(tmp_path / "away.png", label)
    ds.refresh()
    info = ds.get_label_info("a", "final")
    assert info["class_name"] == "glioma" and info["client_id"] == "ann1"
    # the image away (its labels go with it in MONAI Label's index)
    shutil.move(studies / "a.jpg", tmp_path / "a.jpg")
    ds.refresh()
    assert "a" not in ds._datastore.objects
    shutil.move(tmp_path / "a.jpg", studies / "a.jpg")
    ds.refresh()
    assert ds.get_label_info("a", "final")["class_name"] == "glioma"

    # a save whose index cannot be written changes nothing
    real = mod.TumorlensDatastore._update_datastore_file

    def full_disk(self, lock=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mod.TumorlensDatastore, "_update_datastore_file", full_disk)
    with pytest.raises(HTTPException) as ei:
        ds.save_label("a", str(mask_b), "final", {"class_name": "meningioma", "client_id": "ann2"})
    assert ei.value.status_code == 507 and "not saved: no space left" in ei.value.detail
    assert label.read_bytes() == first and ds.get_label_info("a", "final")["class_name"] == "glioma"
    history = studies / ".tumorlens" / "label-history" / "final" / "a"
    assert not history.exists() or not [p for p in history.iterdir() if p.suffix == ".png"]
    monkeypatch.setattr(mod.TumorlensDatastore, "_update_datastore_file", real)
    # a save that succeeds keeps the label it replaces, with its info
    ds.save_label("a", str(mask_b), "final", {"class_name": "meningioma", "client_id": "ann2"})
    kept = [p for p in history.iterdir() if p.suffix == ".png"]
    assert len(kept) == 1 and kept[0].read_bytes() == first
    assert json.loads(kept[0].with_suffix(".json").read_text())["client_id"] == "ann1"

    # an image file gone and another image uploaded under its id: the new one inherits neither the old info nor
    # the old label file (which goes to the label history)
    shutil.move(studies / "a.jpg", tmp_path / "a.jpg")
    ds.refresh()
    ds.add_image("a", str(dev2d / rows[1]["image"]), {})
    ds.refresh()
    assert "final" not in ds._datastore.objects["a"].labels and not label.exists()
    assert len([p for p in history.iterdir() if p.suffix == ".png"]) == 2
    ds.save_label("a", str(mask_b), "final", {"class_name": "meningioma", "client_id": "ann2"})

    # a damaged index: the server starts, with every label's class
    (studies / "datastore_v2.json").write_text('{"name": "x", "objects": {"a": {"ima')
    ds2 = mod.TumorlensDatastore(str(studies), auto_reload=False)
    assert ds2.get_label_info("a", "final")["class_name"] == "meningioma"
    assert list(studies.glob("datastore_v2.json.damaged-*"))


def test_deletions_stay_deleted_across_processes_and_the_history_keeps_the_last_five(dev2d, tumour_rows, tmp_path,
                                                                                      monkeypatch):
    """What an outside probe with eight clients and a 1,200-image folder found (session 35):
    - a scoring run's datastore (a second process on the same folder) saw the server's deletions as files gone
      missing and kept their info aside; a later file of that name got a deleted label's class and annotator;
    - label-history copies of saves within one second shared a name and overwrote each other (kept 2, 3, 4, 5, 7
      of 1..8 instead of the last five replaced, 3..7);
    - a model's prediction saved over a label kept the annotator's class;
    - when every candidate was held, two picks within one second handed out the same image."""
    import json
    import shutil

    from PIL import Image

    mod = _app_module("lib.datastore")
    studies = tmp_path / "studies"
    studies.mkdir()
    rows = [r for r in tumour_rows if r["label"] == "glioma"][:3]
    for name, r in zip("abc", rows, strict=True):
        shutil.copy(dev2d / r["image"], studies / f"{name}.jpg")
    server = mod.TumorlensDatastore(str(studies), auto_reload=False)
    mask = dev2d / rows[0]["mask"]
    server.save_label("a", str(mask), "final", {"class_name": "glioma", "client_id": "ann1"})
    server.save_label("b", str(dev2d / rows[1]["mask"]), "final", {"class_name": "glioma", "client_id": "ann1"})
    scoring = mod.TumorlensDatastore(str(studies), auto_reload=False)  # a scoring run's view, read before the deletes

    server.remove_label("a", "final")
    server.remove_image("b")
    # its watcher sees the files go before the server's index write reaches it (it still lists them)
    monkeypatch.setattr(scoring, "_init_from_datastore_file", lambda *a, **k: None)
    scoring.refresh()
    label = studies / "labels" / "final" / "a.png"
    Image.fromarray(np.zeros(np.asarray(Image.open(mask)).shape, np.uint8)).save(label)  # a sync tool's file
    shutil.copy(dev2d / rows[1]["image"], studies / "b.jpg")
    server.refresh()
    assert not server.get_label_info("a", "final").get("class_name")
    assert server.get_label_info("a", "final").get("client_id") != "ann1"
    assert "client_id" not in server.get_image_info("b")

    # the label history keeps the last five labels replaced, in order, however fast they come
    for i in range(8):
        server.save_label("c", str(dev2d / rows[2]["mask"]), "final", {"class_name": "glioma", "client_id": f"s{i}"})
    history = studies / ".tumorlens" / "label-history" / "final" / "c"
    kept = sorted(p for p in history.iterdir() if p.suffix == ".json")
    assert [json.loads(p.read_text())["client_id"] for p in kept] == ["s2", "s3", "s4", "s5", "s6"]

    # a model's prediction saved over an annotator's label (a tag other than final) does not take their class
    server.save_label("c", str(dev2d / rows[2]["mask"]), "original", {"class_name": "glioma", "client_id": "ann"})
    server.save_label("c", str(dev2d / rows[2]["mask"]), "original",
                      {"model": "segmentation", "params": {"label": "meningioma"}})
    assert "class_name" not in server.get_label_info("c", "original")

    # picks within one second: the image handed out a moment ago is not the oldest
    strategies = _app_module("lib.activelearning.strategies")

    class Store:
        def get_image_info(self, i):
            return {"strategy": {"random": {"ts": 1_000_000}}}

    monkeypatch.setattr(strategies, "_recent_picks", {})
    strategies.note_pick("x")
    pool, held = strategies.free_first(["x", "y"], strategies.last_picked(Store(), ["x", "y"]), 10**10)
    assert pool == ["y"] and held == 2


def test_a_scoring_run_keeps_what_it_scored_before_it_stopped(dev2d, dev_rows, tmp_path, monkeypatch):
    """A run over 1,200 images stopped with the server at 10 % kept nothing, and the next run began again
    (session 35 probe); scores of deleted images were kept for ever, and every scored pick reads them all."""
    import json
    import shutil

    scores = _app_module("lib.scoring.scores")
    state_mod = _app_module("lib.state")
    mod = _app_module("lib.datastore")
    studies = tmp_path / "studies"
    studies.mkdir()
    for i, r in enumerate(dev_rows[:5]):
        shutil.copy(dev2d / r["image"], studies / f"s{i}.jpg")
    ds = mod.TumorlensDatastore(str(studies), auto_reload=False)
    state = state_mod.AppState(studies / ".tumorlens", None)
    calls = []

    def score(model, img):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the run is stopped here
        return {"entropy_normalised": 0.5}

    monkeypatch.setitem(scores.KINDS, "uncertainty", score)
    monkeypatch.setattr(scores, "FLUSH_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        scores.score_images(state, ds, "uncertainty", sorted(ds.list_images()))
    kept = json.loads(state.scores_file.read_text())
    assert sorted(kept) == ["s0", "s1", "s2"]
    # the next run scores the rest only, and forgets images no longer in the datastore
    calls[:] = [1, 1, 1, 1]
    ds.remove_image("s0")
    res = scores.TumorlensScoring(state, "uncertainty")({}, ds)
    assert res["scored"] == 4 and len(calls) == 6
    assert sorted(json.loads(state.scores_file.read_text())) == ["s1", "s2", "s3", "s4"]


def test_a_train_or_scoring_subprocess_ends_with_its_server(tmp_path):
    """A scoring run went on after its server stopped (session 35 probe); uvicorn ends the server by re-raising
    the stop signal, so the server cannot stop it on the way out: the subprocess asks the kernel to end it with its
    parent (``end_with_the_server``), and ends at once if the server is already gone."""
    import signal
    import subprocess
    import time

    app = project_root() / "monai_app"
    code = (f"import sys, time; sys.path.insert(0, {str(app)!r}); from main import end_with_the_server; "
            "end_with_the_server(); print('ready', flush=True); time.sleep(60)")
    # the server it was started for is gone already (another process holds the recorded pid)
    gone = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TUMORLENS_SERVER_PID": "1"},
                          capture_output=True, text=True, timeout=300)
    assert gone.returncode == -signal.SIGTERM and "ready" not in gone.stdout
    # the server ends while it runs
    parent = subprocess.Popen(["bash", "-c", f'export TUMORLENS_SERVER_PID=$$; "{sys.executable}" -c "$0" & echo $!; '
                                             "wait", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"  # the child's own line: past the call under test
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _datastore_of_one_glioma(dev2d, tumour_rows, tmp_path):
    """The app's datastore module and a datastore holding one glioma JPEG as image ``a``."""
    import shutil

    mod = _app_module("lib.datastore")
    studies = tmp_path / "studies"
    studies.mkdir()
    row = next(r for r in tumour_rows if r["label"] == "glioma")
    shutil.copy(dev2d / row["image"], studies / "a.jpg")
    return mod, studies, mod.TumorlensDatastore(str(studies), auto_reload=False), row


def test_a_save_killed_midway_leaves_the_earlier_label_in_place(dev2d, tumour_rows, tmp_path, monkeypatch):
    """The label a save replaces was moved into the label history before the new file was written: a server killed
    between the two (an outside test's kill during a stream of saves) lost the acknowledged label, and the restarted
    server dropped it from the index. The earlier label now stays in place until the new one replaces it."""
    mod, studies, ds, row = _datastore_of_one_glioma(dev2d, tumour_rows, tmp_path)
    ds.save_label("a", str(dev2d / row["mask"]), "final", {"class_name": "glioma"})
    label = studies / "labels" / "final" / "a.png"
    first = label.read_bytes()

    def killed(src, dest):  # the process dies while writing the new file (not an error it could handle)
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "atomic_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        ds.save_label("a", str(dev2d / row["mask"]), "final", {"class_name": "glioma"})
    assert label.read_bytes() == first
    ds2 = mod.TumorlensDatastore(str(studies), auto_reload=False)  # what the restarted server lists
    assert ds2.get_label_info("a", "final")["class_name"] == "glioma"


def test_a_two_layer_slicer_segmentation_keeps_its_painted_class_and_a_mistyped_tag_is_the_standard_one(
        dev2d, tumour_rows, tmp_path):
    """An outside probe (session 38): a 3D Slicer ``.seg.nrrd`` with overlapping segments (two layers) was stored
    with no class (its painted glioma segment was read by value alone), and the tags "Final", "FINAL", "final "
    were stored apart from "final", leaving the image unlabelled."""
    import nrrd
    import SimpleITK as sitk

    mod, studies, ds, row = _datastore_of_one_glioma(dev2d, tumour_rows, tmp_path)
    ref = sitk.ReadImage(str(studies / "a.jpg"))  # the geometry 3D Slicer gives the picture (ITK's)
    w, h = ref.GetSize()
    vox = np.zeros((2, w, h, 1), np.uint8)
    vox[0, w // 3:w // 2, h // 3:h // 2, 0] = 1  # layer 0: "glioma" painted (value 1), "tumor" (value 2) not
    vox[1, w // 3 + 5:w // 2 + 5, h // 3:h // 2, 0] = 1  # layer 1: an overlapping "salient area"
    head = {"type": "unsigned char", "dimension": 4, "space": "left-posterior-superior", "encoding": "gzip",
            "kinds": ["list", "domain", "domain", "domain"], "space origin": np.zeros(3),
            "space directions": np.vstack([np.full(3, np.nan), np.eye(3)])}
    for i, (name, value, layer) in enumerate([("glioma", 1, 0), ("tumor", 2, 0), ("salient area", 1, 1)]):
        head.update({f"Segment{i}_ID": f"Segment_{i + 1}", f"Segment{i}_Name": name, f"Segment{i}_LabelValue": str(value),
                     f"Segment{i}_Layer": str(layer), f"Segment{i}_Color": "0.5 0.5 0.5", f"Segment{i}_Tags": "|",
                     f"Segment{i}_Extent": f"0 {w - 1} 0 {h - 1} 0 0"})
    seg = tmp_path / "label.seg.nrrd"
    nrrd.write(str(seg), vox, head, index_order="F")
    assert mod.class_from_segments(str(seg), None) == "glioma"
    ds.save_label("a", str(seg), "Final ", {"client_id": "ann1"})
    labels = ds._datastore.objects["a"].labels
    assert list(labels) == ["final"] and labels["final"].info["class_name"] == "glioma"
    assert "a" not in mod.training_gaps(ds)


def test_a_raw_label_buffer_as_ohif_saves_it_lands_on_the_volume(brats, tmp_path):
    """The OHIF MONAI Label plugin saves a labelmap as its raw buffer, ``label.bin`` (one uint8 per voxel, x
    fastest); MONAI Label's own DICOMweb datastore converts it with the image's geometry. Here it was a 400, so OHIF
    could save no label (an outside probe, session 38). A buffer of the wrong size is a 400 that says why."""
    from fastapi import HTTPException

    from tumorlens.activelearning.finetune import read_label_like

    mod = _app_module("lib.datastore")
    studies = tmp_path / "studies"
    studies.mkdir()
    src = nib.load(str(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)[60:180, 50:190, 40:110]
    aff = src.affine.copy()
    aff[:3, 3] = (src.affine @ np.array([60, 50, 40, 1.0]))[:3]
    nib.save(nib.Nifti1Image(data, aff), str(studies / "v.nii.gz"))
    truth = np.asarray(nib.load(str(brats / "pat0001" / "OTMultiClass.nii.gz")).dataobj)[60:180, 50:190, 40:110] > 0
    ds = mod.TumorlensDatastore(str(studies), auto_reload=False)
    buf = tmp_path / "label.bin"
    buf.write_bytes(truth.astype(np.uint8).tobytes(order="F"))
    ds.save_label("v", str(buf), "final", {"class_name": "glioma"})
    stored = ds.get_label_uri("v", "final")
    assert stored.endswith(".nii.gz")
    got = read_label_like(stored, read_image(studies / "v.nii.gz"))
    assert np.array_equal(got > 0, truth)
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 1000)
    with pytest.raises(HTTPException) as e:
        ds.save_label("v", str(short), "final", {"class_name": "glioma"})
    assert e.value.status_code == 400 and "1000 bytes" in e.value.detail
    assert np.array_equal(read_label_like(ds.get_label_uri("v", "final"), read_image(studies / "v.nii.gz")) > 0, truth)
