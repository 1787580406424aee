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

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def write_mr_series(vol: np.ndarray, affine: np.ndarray, folder: Path) -> str:
    """One MR series (one file per axial slice, no patient identifiers) of a RAS volume ``[X, Y, Z]``."""
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
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "MR", study, series
        ds.PatientID, ds.PatientName = "anon", "anon"
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
