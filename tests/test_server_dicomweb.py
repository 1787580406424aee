"""DICOMweb datastore: a real Orthanc (Debian packages ``orthanc``, ``orthanc-dicomweb``) on
loopback holding an MR series made from a real volume; the app serves it through MONAI Label's
DICOMweb datastore (search filter Modality MR) and the mask comes back on the series' geometry."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from tumorlens.paths import sample_studies_dir

pytest.importorskip("monailabel")
from monailabel.client import MONAILabelClient  # noqa: E402

from tumorlens.serving.process import ServerProcess, free_port  # noqa: E402

RUNNING: dict[str, subprocess.Popen] = {}  # url -> the Orthanc process serving it (a test may stop it)
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def write_mr_series(vol: np.ndarray, affine: np.ndarray, folder: Path, modality: str = "MR",
                    patient: tuple[str, str] = ("anon", "anon"), skip: int | None = None) -> str:
    """One series (one file per axial slice; ``skip``: a slice left out) of a RAS volume ``[X, Y, Z]``;
    ``patient``: (PatientID, PatientName)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / sp[0], lps[:3, 1] / sp[1]  # DICOM: columns advance along x, rows along y
    v = vol - vol.min()
    v = np.round(v / max(v.max(), 1e-9) * 4000).astype(np.uint16)
    for k in range(vol.shape[2]):
        if k == skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = modality, study, series
        ds.PatientID, ds.PatientName = patient
        ds.PatientBirthDate, ds.StudyDate = "19700101", "20261201"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.PixelSpacing = [float(sp[1]), float(sp[0])]
        ds.SliceThickness = float(sp[2])
        ds.ImagePositionPatient = [float(x) for x in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(x) for x in (*row_dir, *col_dir)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(v[:, :, k].T).tobytes()  # rows = y, columns = x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(str(folder / f"{k:03d}.dcm"), ds, write_like_original=False)
    return series


@pytest.fixture
def orthanc(tmp_path):
    if ORTHANC is None or not PLUGIN.exists():
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    port = free_port()
    store = tmp_path / "orthanc"
    store.mkdir()
    cfg = {"Name": "tumorlens-test", "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "DicomServerEnabled": False, "StorageDirectory": str(store / "db"), "IndexDirectory": str(store / "db"),
           "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (store / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([ORTHANC, f"--logfile={store / 'orthanc.log'}", str(store / "orthanc.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if requests.get(url + "/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise RuntimeError("Orthanc did not start")
        RUNNING[url] = proc
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_dicomweb_datastore_serves_mr_series(orthanc, tmp_path):
    im = nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    vol = np.asanyarray(im.dataobj).astype(np.float32)[:, :, 30:42]
    aff = im.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ np.array([0, 0, 30]) + aff[:3, 3]
    series = write_mr_series(vol, aff, tmp_path / "series")
    for f in sorted((tmp_path / "series").glob("*.dcm")):
        assert requests.post(orthanc + "/instances", data=f.read_bytes(), timeout=30).ok
    env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
           "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"), "TUMORLENS_STATE_DIR": str(tmp_path / "state")}
    with ServerProcess(orthanc + "/dicom-web", env=env, log_path=tmp_path / "server.log") as srv:
        c = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        info = c.info()
        assert info["datastore"]["total"] == 1
        out, res = c.infer("segmentation", series, {})
        lab = nib.load(out)
        assert res["input"]["kind"] == "volume" and lab.shape == vol.shape
        # the mask's voxel grid is the series' grid: same world position of every voxel
        assert np.allclose(lab.affine, aff, atol=1e-3), (lab.affine, aff)
        _, cls = c.infer("classification", series, {})
        assert json.loads(cls)["label"] in ("glioma", "meningioma", "pituitary", "no_tumor")
        nxt = c.next_sample("uncertainty", {})
        assert nxt["id"] == series


@pytest.mark.slow
def test_a_pacs_behind_ohif_keeps_patients_private_and_series_checked(orthanc, tmp_path):
    """An outside probe ran the server over Orthanc as OHIF does: PatientID came back in datastore listings and
    next-sample answers; a CT and a DICOM SEG were analysed as MR; a series with a missing slice was stacked
    evenly; saving a final label was a bare 500 (dcmqi) and other tags were stored unchecked; a malformed or
    unknown SeriesInstanceUID was a 500."""
    im = nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    vol = np.asanyarray(im.dataobj).astype(np.float32)[:, :, 30:42]
    aff = im.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ np.array([0, 0, 30]) + aff[:3, 3]
    series = {
        "mr": write_mr_series(vol, aff, tmp_path / "mr", patient=("MRN1234567", "Doe^Jane")),
        "mr2": write_mr_series(vol[::-1], aff, tmp_path / "mr2", patient=("MRN7654321", "Roe^John")),
        "ct": write_mr_series(vol, aff, tmp_path / "ct", modality="CT", patient=("MRN5550001", "Poe^Ann")),
        "gap": write_mr_series(vol, aff, tmp_path / "gap", patient=("MRN5550002", "Moe^Bo"), skip=6),
    }
    for name in series:
        for f in sorted((tmp_path / name).glob("*.dcm")):
            assert requests.post(orthanc + "/instances", data=f.read_bytes(), timeout=30).ok
    env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
           "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"), "TUMORLENS_STATE_DIR": str(tmp_path / "state"),
           "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "3"}
    with ServerProcess(orthanc + "/dicom-web", env=env, log_path=tmp_path / "server.log") as srv:
        c = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        out, _ = c.infer("segmentation", series["mr"], {})
        # the CT is not listed (MR filter) but OHIF may send any series of a study: it gets the modality caveat
        _, ct = c.infer("classification", series["ct"], {})
        assert any("modality is CT" in x for x in json.loads(ct)["caveats"]), json.loads(ct)
        # a missing slice is refused, as for a local DICOM folder, instead of stacked at an even spacing
        r = requests.post(f"{srv.url}/infer/classification", params={"image": series["gap"], "output": "json"},
                          timeout=300)
        assert r.status_code == 400 and "slice" in r.text.lower(), r.text
        for bad, status in (("1.2.3..4", 400), ("abc", 400), ("1.2.3.4;DROP", 400), ("1.2.826.0.1.99999", 404)):
            r = requests.post(f"{srv.url}/infer/classification", params={"image": bad, "output": "json"}, timeout=120)
            assert r.status_code == status, (bad, r.status_code, r.text)
        # a final label is kept (checked) in the server's cache, and the series leaves the pool
        assert c.save_label(series["mr"], out, tag="final", params={"class_name": "glioma"})["label"] == series["mr"]
        r = requests.put(f"{srv.url}/datastore/label", params={"image": series["mr"], "tag": "mytag"},
                         files={"label": ("notimg.txt", b"not an image")}, data={"params": "{}"}, timeout=60)
        assert r.status_code == 400, r.text
        # the series with a missing slice is listed (it is MR) but cannot be read: scoring records it, and no
        # strategy hands it out (it made next-sample a 400 for everyone whenever the random pick fell on it)
        nxt = c.next_sample("uncertainty", {})
        assert nxt["id"] == series["mr2"] and nxt["unusable"] == 1, nxt
        for _ in range(4):
            pick = c.next_sample("random", {"hold_seconds": 0})
            assert pick["id"] == series["mr2"] and pick["unusable"] == 1, pick
        # no patient identifier in what clients are sent, nor in the server's log
        answers = json.dumps(c.datastore()) + json.dumps(nxt) + requests.get(
            f"{srv.url}/datastore/image/info", params={"image": series["mr"]}, timeout=30).text
        for ident in ("MRN1234567", "MRN7654321", "Doe^Jane", "Roe^John", "19700101", "20261201"):
            assert ident not in answers, ident
        assert "MRN1234567" not in (tmp_path / "server.log").read_text()
        # the PACS goes down: the server answers at once for what it has (it held every request for 30 s and
        # then failed with a bare 500), and a series it never fetched is a 503
        RUNNING[orthanc].terminate()
        RUNNING[orthanc].wait(15)
        time.sleep(4)  # the series list expires
        t0 = time.time()
        assert c.info()["datastore"]["total"] >= 3
        assert c.next_sample("random", {"hold_seconds": 0})["id"] == series["mr2"]
        _, res = c.infer("classification", series["mr2"], {})
        assert time.time() - t0 < 20, time.time() - t0
        r = requests.post(f"{srv.url}/infer/classification", params={"image": "1.2.826.0.1.424242", "output": "json"},
                          timeout=60)
        assert r.status_code in (404, 503), (r.status_code, r.text)
