"""The Slicer module's Logic on the real MRML classes of ``slicer-core`` (no Qt, no Slicer app).

Part 1 needs no server: a result file produced in-process by the Predictor is loaded as a
segmentation and a heatmap, saved as .seg.nrrd and read back with ``slicerio``, on a real BraTS volume
and on the same voxels with an oblique (rotated) affine.
Part 2 runs the same path against a real ``tumorlens serve`` on loopback (one server per module).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorlens.paths import project_root

sys.path.insert(0, str(project_root() / "slicer_module" / "TumorLens"))

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) provides the MRML classes")
import slicerio  # noqa: E402
import TumorLens  # noqa: E402
import vtk  # noqa: E402

import TumorLensLib as tll  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture
def logic(scene):
    return TumorLens.TumorLensLogic(scene, timeout=900)  # saliency + registration: minutes on a loaded 2-core box


@pytest.fixture(scope="session")
def t1c(brats) -> Path:
    return brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz"


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.fixture(scope="session")
def oblique(t1c, tmp_path_factory) -> Path:
    """Real voxels (the 70 axial slices holding the tumour, to keep CPU time down) with a rotated
    affine (non-identity direction matrix), rotated about the volume centre."""
    img = nib.load(str(t1c))
    z0, z1 = 30, 100
    data = np.asarray(img.dataobj, dtype=np.float32)[:, :, z0:z1]
    aff = img.affine.copy()
    aff[:3, 3] = (aff @ np.array([0, 0, z0, 1.0]))[:3]
    centre = aff @ np.r_[(np.array(data.shape) - 1) / 2.0, 1.0]
    rot = np.eye(4)
    rot[:3, :3] = rotation(25.0, 12.0)
    shift = np.eye(4)
    shift[:3, 3] = centre[:3]
    new = shift @ rot @ np.linalg.inv(shift) @ aff
    out = tmp_path_factory.mktemp("oblique") / "oblique_t1c.nii.gz"
    nimg = nib.Nifti1Image(data, new)
    nimg.set_qform(new, code=1)
    nimg.set_sform(new, code=1)
    nib.save(nimg, str(out))
    return out


@pytest.fixture(scope="session")
def inprocess_result(oblique, tmp_path_factory, predictor) -> dict:
    """Mask + tumour probability of the real model for the oblique volume, written as NIfTI files
    on the input's own affine, exactly as the server's tasks write them."""
    from tumorlens.data import read_image

    img = read_image(str(oblique))
    pred = predictor.predict(img)
    out = tmp_path_factory.mktemp("inprocess")
    aff = np.asarray(img.affine, dtype=float)
    mask = pred.mask.numpy()[0].astype(np.uint8)
    assert mask.any(), "the model found no tumour voxel in a glioma volume"
    nib.save(nib.Nifti1Image(mask, aff), str(out / "mask.nii.gz"))
    heat = pred.seg_prob.numpy()[0].astype(np.float32)
    nib.save(nib.Nifti1Image(heat, aff), str(out / "heatmap.nii.gz"))
    return {"mask": out / "mask.nii.gz", "heatmap": out / "heatmap.nii.gz", "affine": aff, "mask_array": mask,
            "heat_array": heat, "probabilities": pred.probabilities}


def ijk_to_ras(node) -> np.ndarray:
    return TumorLens.TumorLensLogic.ijk_to_ras(node)


def slicerio_ras(seg: dict) -> np.ndarray:
    return LPS @ np.asarray(seg["ijkToLPS"], dtype=float)


def world_centroid(mask_xyz: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask_xyz > 0).mean(0)
    return (affine @ np.r_[ijk, 1.0])[:3]


def check_seg_nrrd(path: Path, expected: dict[str, int], affine: np.ndarray, centroids: dict[str, np.ndarray]):
    """Names, voxel counts and geometry of a saved .seg.nrrd, read by slicerio (independent of Slicer)."""
    seg = slicerio.read_segmentation(str(path))
    names = [s["name"] for s in seg["segments"]]
    assert sorted(names) == sorted(expected)
    vox = seg["voxels"]
    for s in seg["segments"]:
        sel = vox == s["labelValue"] if vox.ndim == 3 else vox[..., s["layer"]] == s["labelValue"]
        assert int(sel.sum()) == expected[s["name"]], s["name"]
        # the segment lands where the label file put it, in world (RAS) millimetres
        got = world_centroid(sel, slicerio_ras(seg))
        assert np.allclose(got, centroids[s["name"]], atol=0.5), (s["name"], got, centroids[s["name"]])
    return seg


# ---- part 1: no server --------------------------------------------------------------------------------

def test_load_volume_keeps_geometry(logic, t1c, oblique):
    for path in (t1c, oblique):
        node = logic.load_volume(str(path))
        ref = nib.load(str(path))
        assert np.allclose(ijk_to_ras(node), ref.affine, atol=1e-4), path.name
        arr = slicer.util.arrayFromVolume(node)  # (k, j, i)
        assert np.array_equal(np.transpose(arr, (2, 1, 0)), np.asarray(ref.dataobj, dtype=np.float32))
    rot = ijk_to_ras(node)[:3, :3]
    assert not np.allclose(np.abs(rot), np.abs(np.round(rot)))  # truly oblique, not a flip


def test_image_id_is_content_hash_without_names(logic, t1c, oblique):
    a = logic.load_volume(str(t1c), name="Patient Name Here")
    b = logic.load_volume(str(t1c), name="other")
    c = logic.load_volume(str(oblique))
    ia, ib, ic = logic.image_id(a), logic.image_id(b), logic.image_id(c)
    assert ia == ib != ic and ia.startswith("img-") and "Patient" not in ia
    assert a.GetAttribute(TumorLens.IMAGE_ID_ATTR) == ia
    _, path = logic.prepare_upload(a)
    assert Path(path).name == f"{ia}.nii.gz"
    assert np.allclose(nib.load(path).affine, nib.load(str(t1c)).affine, atol=1e-4)


def test_inprocess_mask_loads_in_place_on_oblique_volume(logic, oblique, inprocess_result, tmp_path):
    volume = logic.load_volume(str(oblique))
    findings = {"schema_version": "1.0", "regions": [
        {"label": "Right_Temporal_Pole", "name": "temporal pole", "hemisphere": "right", "fraction": 0.6,
         "max_probability": 70.0}]}
    seg, segments = logic.load_label_as_segmentation(str(inprocess_result["mask"]), volume, {"lesion": 1}, findings)
    mask = inprocess_result["mask_array"]
    assert len(segments) == 1
    s = seg.GetSegmentation().GetSegment(segments[0]["id"])
    assert s.GetName() == "lesion - temporal pole (right)" and not s.GetNameAutoGenerated()
    assert segments[0]["regions"] == "temporal pole (right) 60%"
    assert segments[0]["voxels"] == int(mask.sum())
    value = vtk.reference("")
    assert s.GetTag("TumorLens.LabelValue", value) and str(value) == "1"
    # helper nodes are gone; only the volume, its display/storage and the segmentation remain
    assert scene_names(logic.scene).count("__tumorlens_label__") == 0
    out = logic.save_segmentation(seg, str(tmp_path / "lesion.seg.nrrd"))
    saved = check_seg_nrrd(Path(out), {segments[0]["name"]: int(mask.sum())}, inprocess_result["affine"],
                           {segments[0]["name"]: world_centroid(mask, inprocess_result["affine"])})
    tags = saved["segments"][0]["tags"]
    assert tags["TumorLens.Regions"] == "temporal pole (right) 60%" and tags["TumorLens.AtlasLabel"] == "lesion"
    assert saved["segments"][0]["nameAutoGenerated"] is False and saved["segments"][0]["colorAutoGenerated"] is False
    # exported back onto the volume grid it is the very same mask, voxel for voxel
    path, names = logic.export_label(seg, volume, str(tmp_path / "back.nii.gz"))
    back = nib.load(path)
    assert names == {segments[0]["name"]: 1}
    assert np.allclose(back.affine, inprocess_result["affine"], atol=1e-3)
    assert np.array_equal(np.asarray(back.dataobj) > 0, mask > 0)


def scene_names(scene) -> list[str]:
    return [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]


def test_multi_region_label_file_gets_distinct_named_segments(logic, t1c, brats, tmp_path):
    """A label file with several values (the real BraTS labels standing in for region values)."""
    volume = logic.load_volume(str(t1c))
    lab_path = brats / "pat0001" / "OTMultiClass.nii.gz"
    lab = nib.load(str(lab_path))
    arr = np.asarray(lab.dataobj)
    names = {"Left_Insular_Cortex": 1, "Right_Putamen": 2, "Brain-Stem": 3}  # value 4 left unnamed on purpose
    findings = {"schema_version": "1.0", "regions": [
        {"label": "Left_Insular_Cortex", "name": "insular cortex", "hemisphere": "left", "fraction": 0.5,
         "max_probability": 60.0}]}
    seg, segments = logic.load_label_as_segmentation(str(lab_path), volume, names, findings)
    got = {s["name"]: s for s in segments}
    assert set(got) == {"insular cortex (left)", "putamen (right)", "brain stem (midline)", "label 4"}
    assert got["insular cortex (left)"]["fraction"] == 0.5
    for s in segments:
        assert s["voxels"] == int((arr == s["value"]).sum())
    colours = [tuple(seg.GetSegmentation().GetSegment(s["id"]).GetColor()) for s in segments]
    assert len(set(colours)) == len(colours)
    out = logic.save_segmentation(seg, str(tmp_path / "regions.seg.nrrd"))
    check_seg_nrrd(Path(out), {s["name"]: s["voxels"] for s in segments}, lab.affine,
                   {s["name"]: world_centroid(arr == s["value"], lab.affine) for s in segments})
    # exported for "Submit label": every segment comes back with the value its name is sent with
    path, sent = logic.export_label(seg, volume, str(tmp_path / "submit.nii.gz"))
    back = np.asarray(nib.load(path).dataobj)
    for s in segments:
        assert np.array_equal(back == sent[s["name"]], arr == s["value"]), s["name"]
    # a "whole tumour" segment drawn over the sub-regions: a label map of one value per voxel kept only it, and the
    # sub-regions were lost with no word (session 39 probe); refused now, naming what would be lost
    whole = tmp_path / "whole.nii.gz"
    nib.save(nib.Nifti1Image((arr > 0).astype(np.uint8), lab.affine), str(whole))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        logic.load_volume(str(whole), labelmap=True), seg)
    with pytest.raises(ValueError, match="segments overlap.*'insular cortex \\(left\\)'"):
        logic.export_label(seg, volume, str(tmp_path / "overlap.nii.gz"))
    # a tumour-free image's label is a mask of zeros on the volume's grid (it could not be submitted at all)
    path, sent = logic.export_label(None, volume, str(tmp_path / "none.nii.gz"), allow_empty=True)
    zeros = nib.load(path)
    assert sent == {} and zeros.shape[:3] == nib.load(str(t1c)).shape and not np.asarray(zeros.dataobj).any()


def test_heatmap_volume_with_colour_map_and_opacity(logic, oblique, inprocess_result):
    volume = logic.load_volume(str(oblique))
    heat = logic.load_heatmap(str(inprocess_result["heatmap"]))
    arr = np.transpose(slicer.util.arrayFromVolume(heat), (2, 1, 0))
    assert np.allclose(arr, inprocess_result["heat_array"]) and arr.min() >= 0 and arr.max() <= 1
    disp = heat.GetDisplayNode()
    colour = disp.GetColorNode()
    assert colour.GetName() == TumorLens.HEAT_COLOR_NODE and colour.GetNumberOfColors() == 256
    assert (disp.GetWindow(), disp.GetLevel()) == pytest.approx((1.0, 0.5))
    assert np.allclose(ijk_to_ras(heat), ijk_to_ras(volume))
    views = [logic.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    assert logic.set_heatmap_opacity(0.35, heat, volume) == 3
    assert all(v.GetForegroundVolumeID() == heat.GetID() and v.GetForegroundOpacity() == pytest.approx(0.35)
               for v in views)
    logic.set_heatmap_opacity(7.0)
    assert views[0].GetForegroundOpacity() == 1.0


def test_bad_label_files_are_readable_errors(logic, t1c, tmp_path):
    volume = logic.load_volume(str(t1c))
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="junk.nii.gz"):
        logic.load_label_as_segmentation(str(junk), volume, {"lesion": 1})
    neg = tmp_path / "neg.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), -1.5, np.float32), np.eye(4)), str(neg))
    with pytest.raises(ValueError, match="neg.nii.gz"):
        logic.load_label_as_segmentation(str(neg), volume, {"lesion": 1})
    with pytest.raises(FileNotFoundError):
        logic.load_volume(str(tmp_path / "missing.nii.gz"))
    assert "__tumorlens_label__" not in scene_names(logic.scene)


def test_save_report_next_to_scene(logic, tmp_path):
    logic.scene.SetURL(str(tmp_path / "scene" / "study.mrml"))
    res = logic.save_report({"report": {"findings": "Lesion in the right temporal pole.", "impression": "Glioma."},
                             "verification": {"supported": True, "unsupported_claims": [],
                                              "negation_conflicts": [], "checked": 3}}, "img-abc")
    assert res["verified"] and Path(res["markdown_path"]).parent == tmp_path / "scene"
    assert json.loads(Path(res["json_path"]).read_text())["status"] == res["status"]
    assert "right temporal pole" in Path(res["markdown_path"]).read_text()


def test_one_numbered_file_loads_alone_and_a_dicom_file_its_series(logic, t1c, tmp_path):
    """Slicer's reader stacked '0003.nrrd' with its numbered neighbours into one volume (an outside probe loaded
    one slice of a folder laid out like the 2D dataset and got 256 x 256 x 5, then a report on a 'volume')."""
    import SimpleITK as sitk

    for i in range(1, 6):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 32, 40), i, np.float32)), str(tmp_path / f"{i:04d}.nrrd"))
    node = logic.load_volume(str(tmp_path / "0003.nrrd"))
    assert slicer.util.arrayFromVolume(node).shape == (1, 32, 40) and slicer.util.arrayFromVolume(node).max() == 3
    assert not tll.is_dicom_file(str(tmp_path / "0003.nrrd")) and not tll.is_dicom_file(str(tmp_path / "missing"))
    dcm = tmp_path / "no_extension"
    dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    assert tll.is_dicom_file(str(dcm)) and tll.is_dicom_file("x.DCM")


def test_labels_that_would_reach_the_server_wrong_are_refused(logic, t1c):
    """Two segments of one name collapsed into one label name (the other value unnamed on the server); a segment
    drawn outside the volume exported as an empty label with no word."""
    volume = logic.load_volume(str(t1c))
    affine = np.eye(4)
    affine[:3, 3] = 5000.0  # mm: nowhere near the head
    far = Path(logic.work_dir) / "far-label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), affine), str(far))
    seg, _ = logic.load_label_as_segmentation(str(far), volume, {"tumour": 1})
    with pytest.raises(ValueError, match="no voxel inside the volume"):
        logic.export_label(seg, volume, str(Path(logic.work_dir) / "far.nii.gz"))
    seg.GetSegmentation().AddEmptySegment("", "tumour")
    with pytest.raises(ValueError, match="two segments are named 'tumour'"):
        logic.export_label(seg, volume, str(Path(logic.work_dir) / "twice.nii.gz"))


def test_temporary_copies_go_with_the_logic_and_reports_of_an_unsaved_scene_go_home(scene, monkeypatch, tmp_path):
    """Each logic kept a /tmp/tumorlens-slicer-* folder of copies of the user's images for good (32 folders after
    one probe); a report of a scene never saved went to whatever folder the application started in."""
    logic = TumorLens.TumorLensLogic(scene)
    work = Path(logic.work_dir)
    (work / "copy.nii.gz").write_bytes(b"x")
    logic.cleanup()
    assert not work.exists()
    other = TumorLens.TumorLensLogic(scene)
    gone = Path(other.work_dir)
    del other
    import gc

    gc.collect()
    assert not gone.exists()
    monkeypatch.setenv("HOME", str(tmp_path))
    unsaved = TumorLens.TumorLensLogic(slicer.vtkMRMLScene())
    assert unsaved.report_dir() == str(tmp_path / "TumorLens reports")
    unsaved.cleanup()


def test_not_connected_is_a_server_error(logic):
    with pytest.raises(tll.ServerError, match="not connected"):
        logic.remote_next_sample("random")


def picture_as_slicer_reads_it(scene, path: Path):
    """A volume node holding a picture as 3D Slicer's reader gives it (ITK's pixels and geometry: 1 mm pixels, EXIF
    orientation ignored), with the storage node naming the file (slicer-core reads no JPEG itself)."""
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.stem)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(ref)[None])
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    node.SetSpacing(1.0, 1.0, 1.0)
    node.SetOrigin(0.0, 0.0, 0.0)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


@pytest.fixture(scope="session")
def turned_jpeg(tmp_path_factory) -> Path:
    """A development JPEG stored turned by 90 degrees with an EXIF Orientation tag saying so."""
    from PIL import Image

    up = Image.open(project_root() / "samples" / "studies" / "mri2d_1941.jpg").convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6
    out = tmp_path_factory.mktemp("turned") / "turned.jpg"
    up.transpose(Image.Transpose.ROTATE_90).save(out, quality=95, exif=exif.tobytes())
    return out


def test_a_picture_goes_up_as_the_picture_while_its_volume_is_unchanged(logic, turned_jpeg):
    node = picture_as_slicer_reads_it(logic.scene, turned_jpeg)
    assert logic.picture_source(node) == str(turned_jpeg)
    image_id, path = logic.prepare_upload(node)
    assert path.endswith(".jpg") and Path(path).read_bytes() == turned_jpeg.read_bytes() and image_id.startswith("img-")
    arr = slicer.util.arrayFromVolume(node)  # painted over in Slicer: the volume, not the file, is what is shown
    arr[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(node)
    assert logic.picture_source(node) is None
    image_id2, path2 = logic.prepare_upload(node)
    assert image_id2 != image_id and path2.endswith(".nii.gz")


# ---- part 2: a real tumorlens server on loopback -------------------------------------------------------

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``tumorlens serve`` on a free loopback port (TUMORLENS_MODELS_DIR is inherited); stopped after."""
    exe = shutil.which("tumorlens") or str(Path(sys.executable).parent / "tumorlens")
    studies = tmp_path_factory.mktemp("studies")
    port = _free_port()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    log = open(tmp_path_factory.mktemp("serverlog") / "server.log", "w+")
    proc = subprocess.Popen([exe, "serve", "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"tumorlens serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"tumorlens serve did not answer /info/ in 150 s:\n{log.read()[-3000:]}")
            time.sleep(1.0)
        yield {"url": url, "studies": studies}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.server
def test_server_models_include_classification(logic, server):
    info = logic.connect(server["url"])
    types = {m["name"]: m["type"] for m in info["models"]}
    for name in ("classification", "segmentation", "saliency_gradcam", "saliency_gradcampp", "saliency_scorecam"):
        assert name in types, sorted(types)
    assert types["classification"] == "classification"
    assert {"random", "uncertainty"} <= set(info["strategies"])


@pytest.mark.server
@pytest.mark.slow
def test_server_saliency_to_region_named_segments(logic, server, t1c, tmp_path):
    logic.connect(server["url"])
    volume = logic.load_volume(str(t1c))
    res = logic.run_model(volume, "saliency_gradcampp", heatmap=True)
    image_id = res["image_id"]
    assert image_id in logic.client.datastore()["objects"]  # uploaded because the server lacked it
    findings = res["findings"]
    assert findings and findings["schema_version"].startswith("1.")
    segments = res["segments"]
    label = nib.load(res["label_path"]) if res["label_path"].endswith((".nii.gz", ".nii")) else None
    seg = logic.scene.GetNodeByID(res["segmentation_node_id"])
    assert segments, "saliency gave no segment"
    regions = findings.get("regions") or []
    for s in segments:
        assert not seg.GetSegmentation().GetSegment(s["id"]).GetNameAutoGenerated()
    if len(segments) > 1:  # one label value per atlas region: each name is that region's
        for s in segments:
            assert any(r["name"] in s["name"] for r in regions), (s, regions)
    elif regions:  # one lesion label: named by its main region and side, all regions listed
        top = max(regions, key=lambda r: r["fraction"])
        assert segments[0]["name"].startswith(f"salient area - {top['name']}"), (segments[0], top)
        assert all(r["name"] in segments[0]["regions"] for r in regions)
    else:  # no confident placement: no region is invented
        assert segments[0]["name"] == "salient area" and findings["placement"]["low_confidence"] or \
            findings["placement"]["method"] == "none", (segments[0], findings["placement"])
    out = logic.save_segmentation(seg, str(tmp_path / "saliency.seg.nrrd"))
    vol_affine = nib.load(str(t1c)).affine
    if label is not None:
        arr = np.asarray(label.dataobj)
        assert np.allclose(label.affine, vol_affine, atol=1e-3)
        check_seg_nrrd(Path(out), {s["name"]: int((arr == s["value"]).sum()) for s in segments}, label.affine,
                       {s["name"]: world_centroid(arr == s["value"], label.affine) for s in segments})
    heat = logic.scene.GetNodeByID(res["heatmap_node_id"])
    harr = slicer.util.arrayFromVolume(heat)
    assert harr.min() >= 0.0 and harr.max() <= 1.0 + 1e-6 and harr.max() > 0
    assert np.allclose(ijk_to_ras(heat), vol_affine, atol=1e-3)
    # the report describes the findings shown (sent along), saved next to the scene
    logic.scene.SetURL(str(tmp_path / "scene" / "study.mrml"))
    rep = logic.generate_report(volume)
    assert Path(rep["markdown_path"]).parent == tmp_path / "scene"
    saved = json.loads(Path(rep["json_path"]).read_text())
    assert saved["report"]["findings"] and saved["verification"]
    v = saved["verification"]
    assert rep["verified"] == bool(v.get("supported") and (v.get("fell_back") or not v.get("flagged")))
    assert rep["status"] in Path(rep["markdown_path"]).read_text()
    # a second run does not upload again (same content hash)
    before = len(logic.client.datastore()["objects"])
    cls = logic.run_model(volume, "classification")
    probs = cls["probabilities"]
    assert len(logic.client.datastore()["objects"]) == before
    assert list(probs) == list(tll.CLASS_NAMES) and abs(sum(probs.values()) - 1) < 1e-3
    fam = cls["familiarity"]  # the server's familiarity with the image reaches the Logic's result
    assert {"score", "threshold", "familiar"} <= set(fam) <= {"score", "threshold", "familiar", "layer_score",
                                                              "layer_threshold"}
    layers_ok = "layer_score" not in fam or fam["layer_score"] <= fam["layer_threshold"]
    assert fam["familiar"] == (fam["score"] >= fam["threshold"] and layers_ok)
    # and so do its caveats (a volume: classified slice by slice), the familiarity note among them when unfamiliar
    assert any("slice by slice" in c for c in cls["caveats"])
    assert any("unlike the training images" in c for c in cls["caveats"]) == (not fam["familiar"])
    assert cls["window_opinion"] is None  # a volume is decided by the network alone


@pytest.mark.server
def test_server_mask_on_oblique_volume_lands_in_place(logic, server, oblique, tmp_path):
    logic.connect(server["url"])
    volume = logic.load_volume(str(oblique))
    res = logic.run_model(volume, "segmentation")
    label = nib.load(res["label_path"])
    aff = nib.load(str(oblique)).affine
    assert np.allclose(label.affine, aff, atol=1e-3)  # the server kept the oblique geometry
    arr = np.asarray(label.dataobj)
    seg = logic.scene.GetNodeByID(res["segmentation_node_id"])
    out = logic.save_segmentation(seg, str(tmp_path / "oblique.seg.nrrd"))
    check_seg_nrrd(Path(out), {s["name"]: int((arr == s["value"]).sum()) for s in res["segments"]}, aff,
                   {s["name"]: world_centroid(arr == s["value"], aff) for s in res["segments"]})
    path, _ = logic.export_label(seg, volume, str(tmp_path / "back.nii.gz"))
    assert np.array_equal(np.asarray(nib.load(path).dataobj) > 0, arr > 0)


@pytest.mark.server
def test_server_errors_are_messages_and_server_keeps_serving(logic, server, t1c):
    logic.connect(server["url"])
    volume = logic.load_volume(str(t1c))
    with pytest.raises(tll.ServerError) as e:
        logic.run_model(volume, "no_such_model")
    assert 400 <= e.value.status < 500 and e.value.message
    with pytest.raises(tll.ServerError) as e:
        logic.remote_ensure_image("img-missing", None)
    assert e.value.status == 404
    assert logic.connect(server["url"])["models"]


@pytest.mark.server
def test_server_next_sample_and_submit_label(logic, server, t1c, tmp_path):
    logic.connect(server["url"])
    uploaded = logic.load_volume(str(t1c))
    logic.remote_ensure_image(*logic.prepare_upload(uploaded))
    node = logic.next_sample("random")
    assert node is not None and node.GetAttribute(TumorLens.IMAGE_ID_ATTR)
    image_id = node.GetAttribute(TumorLens.IMAGE_ID_ATTR)
    # a label drawn in Slicer: the real BraTS tumour labels of that volume, as a segmentation
    seg, segments = logic.load_label_as_segmentation(
        str(t1c.parent / "OTMultiClass.nii.gz"), node, {"necrosis": 1, "oedema": 2, "non-enhancing": 3,
                                                          "enhancing": 4})
    res = logic.submit_label(seg, node, class_name="glioma")  # BraTS: gliomas
    assert res.get("image") == image_id and res.get("label")
    labels = logic.client.datastore()["objects"][image_id]["labels"]
    assert "final" in labels
    assert labels["final"]["info"].get("class_name") == "glioma", labels["final"]  # what the trainer reads
    with pytest.raises(tll.ServerError) as e:  # a class the model does not know: refused, nothing changes
        logic.submit_label(seg, node, class_name="lymphoma")
    assert e.value.status == 400 and "lymphoma" in e.value.message
    assert logic.client.datastore()["objects"][image_id]["labels"]["final"]["info"].get("class_name") == "glioma"
    # a tumour-free label from the module: no segmentation, class no_tumor (refused before: session 39 probe)
    res = logic.submit_label(None, node, class_name="no_tumor")
    assert logic.client.datastore()["objects"][image_id]["labels"]["final"]["info"].get("class_name") == "no_tumor"


# ---- module file consistency (the Qt parts cannot run here; check what can be checked) -------------------

def test_widget_uses_only_widgets_of_the_ui_file():
    import re
    import xml.etree.ElementTree as ET

    root = project_root() / "slicer_module" / "TumorLens"
    ui = {w.get("name") for w in ET.parse(root / "Resources" / "UI" / "TumorLens.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (root / "TumorLens.py").read_text()))
    assert used and used <= ui, sorted(used - ui)
    cmake = (root / "CMakeLists.txt").read_text()
    for f in (root / "TumorLensLib").glob("*.py"):
        assert f"TumorLensLib/{f.name}" in cmake, f.name  # every library file is packaged
    assert (root / "Resources" / "Icons" / "TumorLens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_metadata_and_requirements(monkeypatch):
    class Parent:
        pass

    p = Parent()
    TumorLens.TumorLens(p)
    assert p.title == "TumorLens" and "Segmentations" in p.dependencies
    installed = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda spec: installed.append(spec))  # no pip inside tests
    assert TumorLens.ensure_requirements({"json": "json"}) == []
    assert TumorLens.ensure_requirements({"tumorlens_no_such_pkg": "tumorlens-no-such-pkg==1.0"}) == [
        "tumorlens-no-such-pkg==1.0"]
    assert installed == ["tumorlens-no-such-pkg==1.0"]
    assert TumorLens.ensure_requirements() == []  # TumorLensLib needs nothing beyond Slicer's Python


def test_label_and_heatmap_answers_combine(logic, oblique, inprocess_result):
    """A saliency run gives two answers (label, then heatmap): both land, neither hides the other."""
    volume = logic.load_volume(str(oblique))
    findings = {"schema_version": "1.0", "regions": [], "placement": {"low_confidence": True}}
    no_atlas = {"schema_version": "1.0", "regions": [], "notes": ["atlas regions not requested"]}
    answers = [tll.InferAnswer({"label_names": {"lesion": 1}, "findings": findings}, str(inprocess_result["mask"])),
               tll.InferAnswer({"label_names": {"saliency": 1}, "heatmap": True, "findings": no_atlas},
                               str(inprocess_result["heatmap"]))]
    res = logic.apply_answers(answers, volume, "saliency_gradcampp")
    assert res["label_path"] == str(inprocess_result["mask"]) and res["heatmap_path"] == str(inprocess_result["heatmap"])
    assert [s["name"] for s in res["segments"]] == ["lesion"]  # no region named without a placement
    assert res["segments"][0]["voxels"] == int(inprocess_result["mask_array"].sum())
    assert logic.scene.GetNodeByID(res["heatmap_node_id"]).GetDisplayNode().GetColorNode().GetName() == \
        TumorLens.HEAT_COLOR_NODE
    assert res["findings"] == findings and logic.findings[res["image_id"]] == findings  # not the heatmap's
    assert logic.report_params(res["image_id"]) == {"findings": findings}


def test_edited_or_moved_volume_gets_a_new_image_id(logic, oblique):
    """The id is the content as it is now: voxels edited in place or a moved origin must not reuse the id
    (and the server copy) of the volume as it was; a downloaded sample keeps the server's id until edited."""
    volume = logic.load_volume(str(oblique))
    first = logic.image_id(volume)
    assert logic.image_id(volume) == first
    arr = slicer.util.arrayFromVolume(volume)
    arr[:] = 0
    slicer.util.arrayFromVolumeModified(volume)
    blanked = logic.image_id(volume)
    assert blanked != first
    volume.SetOrigin(*(np.array(volume.GetOrigin()) + [50.0, 0.0, 0.0]))
    moved = logic.image_id(volume)
    assert moved not in (first, blanked)
    _, path = logic.prepare_upload(volume)
    assert np.allclose(nib.load(path).affine, ijk_to_ras(volume), atol=1e-4)  # the upload is the moved volume
    sample = logic.apply_sample({"path": str(oblique), "image_id": "server-id-7"})
    assert logic.image_id(sample) == "server-id-7"
    slicer.util.arrayFromVolume(sample)[0, 0, 0] += 1.0
    slicer.util.arrayFromVolumeModified(sample)
    assert logic.image_id(sample).startswith("img-")


def test_results_follow_the_volume_transform_and_replace_their_earlier_run(logic, oblique, inprocess_result):
    volume = logic.load_volume(str(oblique), name="T1c study")
    moved = logic.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 40.0)
    m.SetElement(2, 3, -25.0)
    moved.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(moved.GetID())
    answers = [tll.InferAnswer({"label_names": {"tumor": 1}}, str(inprocess_result["mask"])),
               tll.InferAnswer({"label_names": {"saliency": 1}, "heatmap": True}, str(inprocess_result["heatmap"]))]
    n_before = logic.scene.GetNumberOfNodes()
    res = logic.apply_answers(answers, volume, "segmentation")
    seg, heat = logic.scene.GetNodeByID(res["segmentation_node_id"]), logic.scene.GetNodeByID(res["heatmap_node_id"])
    for node in (seg, heat):  # drawn where the volume is drawn
        assert node.GetTransformNodeID() == moved.GetID()
        assert "T1c study" in node.GetName()
    n_after = logic.scene.GetNumberOfNodes()
    again = logic.apply_answers(answers, volume, "segmentation")  # the same run again replaces its nodes
    assert logic.scene.GetNodeByID(res["segmentation_node_id"]) is None
    assert logic.scene.GetNodeByID(res["heatmap_node_id"]) is None
    assert logic.scene.GetNumberOfNodes() == n_after > n_before
    assert logic.scene.GetNodeByID(again["segmentation_node_id"]).GetTransformNodeID() == moved.GetID()
    other = logic.load_volume(str(oblique), name="other study")  # another volume's result is its own
    logic.apply_answers(answers[:1], other, "segmentation")
    assert logic.scene.GetNodeByID(again["segmentation_node_id"]) is not None


def test_missing_or_removed_volume_and_empty_model_are_readable_errors(logic, oblique, inprocess_result):
    with pytest.raises(ValueError, match="no volume"):
        logic.prepare_upload(None)
    volume = logic.load_volume(str(oblique))
    logic.scene.RemoveNode(volume)  # deleted while its job ran
    answer = tll.InferAnswer({"label_names": {"tumor": 1}}, str(inprocess_result["mask"]))
    with pytest.raises(ValueError, match="no longer in the scene"):
        logic.apply_answer(answer, volume, "segmentation")
    assert logic.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    logic.models = {"segmentation": None}
    with pytest.raises(tll.ServerError, match="segmentation") as e:
        logic.remote_infer("", "img-x", None)
    assert e.value.status == 404


def test_dicom_series_folder_loads_like_the_server_reads_it(logic, brats, tmp_path, write_dicom_series):
    """A series given as its folder (the probe's "could not read this file as a volume"), named by the folder."""
    from tumorlens.data import read_image

    vol = nib.load(str(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")).get_fdata()
    sub = np.transpose(vol[40:200:2, 40:200:2, 60:72], (2, 1, 0))
    folder = write_dicom_series((sub - sub.min()) * 100, tmp_path / "series t1c")
    node = logic.load_volume(str(folder))
    ref = read_image(folder, expect="3d")
    assert node.GetName() == "series t1c"
    assert np.allclose(ijk_to_ras(node), np.asarray(ref.affine), atol=1e-3)
    assert np.array_equal(np.transpose(slicer.util.arrayFromVolume(node), (2, 1, 0)), ref[0].numpy())
    # it goes up as a NIfTI, which keeps no modality: the series' own is written into it (an MR series had been
    # "modality assumed", or CT by its intensities; session 39 probe)
    ct = write_dicom_series((sub - sub.min()) * 100 + 1, tmp_path / "series ct", modality="CT")
    for series, want in ((folder, "MR"), (ct, "CT")):
        sent = read_image(logic.prepare_upload(logic.load_volume(str(series)))[1])
        assert (sent.meta["modality"], sent.meta["modality_from"]) == (want, "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no file"):
        logic.load_volume(str(tmp_path / "empty"))


@pytest.mark.server
def test_server_answers_a_picture_opened_in_slicer_as_the_command_line_does(logic, server, turned_jpeg, predictor):
    """3D Slicer gives a picture 1 mm pixels and ignores its EXIF orientation: sent as Slicer's one-slice volume,
    a JPEG stored turned was classified as stored (the command line reads it upright) and measured in mm². The
    picture itself goes up now: the server's answer is the command line's, and its size is in pixels."""
    from tumorlens.data import read_image

    logic.connect(server["url"])
    node = picture_as_slicer_reads_it(logic.scene, turned_jpeg)
    res = logic.run_model(node, "classification")
    stored = logic.client.datastore()["objects"][res["image_id"]]
    assert stored["image"]["ext"] == ".jpg"
    want = predictor.predict(read_image(turned_jpeg)).probabilities
    assert all(abs(res["probabilities"][c] - want[c]) < 2e-3 for c in want), (res["probabilities"], want)
    assert logic.run_model(node, "segmentation")["segments"]  # as NIfTI: slicer-core (and a PNG) could not place it
    findings = logic.run_model(node, "saliency_gradcam").get("findings") or {}
    assert findings.get("input", {}).get("spacing_known") is False, findings.get("input")
    assert all(m.get("area_mm2") is None for m in findings.get("masks", [])), findings.get("masks")
