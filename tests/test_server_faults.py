"""Crash safety: SIGKILL the server (and its training subprocess) while a training run and a stream
of label saves are in flight; after a restart every saved label is intact, nothing half-written
is served, no half model is current, and training runs again."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorlens.paths import sample_studies_dir, shared_data_dir

pytest.importorskip("monailabel")
from monailabel.client import MONAILabelClient  # noqa: E402

from tumorlens.serving.process import ServerProcess  # noqa: E402

ENV = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "OMP_WAIT_POLICY": "PASSIVE"}
CLASSES = {"1941": "glioma", "0102": "meningioma", "1064": "pituitary"}


def _volume_label(i: int, dest: Path) -> bytes:
    """A different (uncompressed, ~2 MB) label of the sample volume for every save ``i``."""
    ref = nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    data = np.zeros(ref.shape, np.float32)
    data[10 + i % 40: 20 + i % 40, 20:40, 20:40] = 1
    nib.save(nib.Nifti1Image(data, ref.affine), dest)
    return dest.read_bytes()


def _wait_stats(studies: Path, status: str, timeout: float) -> dict:
    f = studies / ".tumorlens" / "train_stats.json"
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            s = json.loads(f.read_text())
            if s.get("status") == status and (status != "RUNNING" or s.get("epochs")):
                return s
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"training never reached {status}")


@pytest.mark.slow
def test_kill_mid_training_and_mid_label_save(tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(sample_studies_dir(), studies)
    env = dict(ENV, MONAI_LABEL_SESSION_PATH=str(tmp_path / "sessions"))
    masks = shared_data_dir() / "brain-mri-2d" / "masks"
    srv = ServerProcess(studies, env=env, log_path=tmp_path / "server1.log").start()
    try:
        c = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        saved: dict[str, bytes] = {}
        for idx, cls in CLASSES.items():
            c.save_label(f"mri2d_{idx}", str(masks / f"{idx}.png"), tag="final", params={"class_name": cls})
            saved[f"mri2d_{idx}.png"] = (masks / f"{idx}.png").read_bytes()
        c.train_start("tumorlens", {"max_epochs": 200})
        _wait_stats(studies, "RUNNING", 240)  # the subprocess is inside the epoch loop

        acked: list[bytes] = []
        inflight: list[bytes] = []
        stop = threading.Event()

        def saver() -> None:
            cw = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
            i = 0
            while not stop.is_set():
                f = tmp_path / f"vol_label_{i}.nii"
                content = _volume_label(i, f)
                inflight.append(content)
                try:
                    cw.save_label("brats_t1c_0001", str(f), tag="final", params={"class_name": "glioma"})
                    acked.append(content)
                except Exception:  # noqa: BLE001 - the server is killed under it
                    return
                i += 1

        t = threading.Thread(target=saver)
        t.start()
        time.sleep(4.0)
        srv.kill()  # SIGKILL: server and training subprocess, mid-save and mid-epoch
        stop.set()
        t.join(30)
        assert acked, "no label save completed before the kill"
    finally:
        srv.stop()

    srv2 = ServerProcess(studies, env=env, log_path=tmp_path / "server2.log").start()
    try:
        c = MONAILabelClient(srv2.url, tmpdir=str(tmp_path / "dl"))
        (tmp_path / "dl").mkdir()
        # nothing half-written is left around or served
        assert not list(studies.rglob("*.partial")) and not list((studies / ".tumorlens" / "models").glob(".incoming-*"))
        objects = c.datastore()["objects"]
        for name, content in saved.items():
            image_id = name.split(".")[0]
            assert "final" in objects[image_id]["labels"]
            assert (studies / "labels" / "final" / name).read_bytes() == content
            assert Path(c.download_label(image_id, "final")).read_bytes() == content
        vol = (studies / "labels" / "final" / "brats_t1c_0001.nii").read_bytes()
        assert vol in (acked[-1], inflight[-1]), "the volume label is neither the last acknowledged nor the in-flight one"
        assert Path(c.download_label("brats_t1c_0001", "final")).read_bytes() == vol
        info = c.info()
        assert info["model_version"].startswith("base:") and info["model_versions"] == []
        assert info["train_stats"]["tumorlens"]["status"] == "INTERRUPTED"
        # training can be started again and publishes the first version
        c.train_start("tumorlens", {"max_epochs": 1})
        t0 = time.time()
        while time.time() - t0 < 300:
            st = c.train_status()
            if st.get("status") not in ("SUBMITTED", "RUNNING"):
                break
            time.sleep(1)
        assert st["status"] == "DONE", list(st.get("details", []))[-10:]
        info = c.info()
        assert info["model_version"] == "v0001" and info["train_stats"]["tumorlens"]["items"] == 4
    finally:
        srv2.stop()
