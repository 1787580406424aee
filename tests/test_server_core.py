"""The active-learning and versioning core behind the server (no server here: fast)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tumorlens.activelearning import (
    ModelVersions,
    image_uncertainty,
    predictive_entropy,
    saliency_seg_disagreement,
)
from tumorlens.activelearning.finetune import finetune, item_arrays, read_label_like
from tumorlens.data import read_image
from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES
from tumorlens.models.registry import CARD, CHECKPOINT
from tumorlens.paths import sample_studies_dir


def test_entropy_bounds():
    assert predictive_entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    assert predictive_entropy(np.array([1.0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-9)


def test_uncertainty_mc_dropout_and_tta(model):
    img = read_image(sample_studies_dir() / "mri2d_1941.jpg")
    u = image_uncertainty(model, img, "mc_dropout", passes=20)
    assert 0.0 <= u["entropy_normalised"] <= 1.0 and u["mutual_information"] >= 0
    assert list(u["probabilities"]) == list(CLASS_NAMES)
    assert sum(u["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert u == image_uncertainty(model, img, "mc_dropout", passes=20)  # seeded: reproducible
    # dropout really samples: the 20 head passes differ, so the mean differs from the plain prediction
    from tumorlens.inference import Predictor

    plain = Predictor(model).predict(img).probabilities
    drop = next(m for m in model.net.classifier if isinstance(m, torch.nn.Dropout))
    if drop.p > 0:
        assert max(abs(u["probabilities"][c] - plain[c]) for c in CLASS_NAMES) > 1e-6
    t = image_uncertainty(model, img, "tta", passes=4)
    assert t["passes"] == 4 and 0.0 <= t["entropy_normalised"] <= 1.0
    with pytest.raises(ValueError):
        image_uncertainty(model, img, "bogus")


def test_uncertainty_volume_and_constant_image(model, tmp_path):
    vol = read_image(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    u = image_uncertainty(model, vol, max_slices=4)
    assert u["slices"] == 4
    import nibabel as nib

    f = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), f)
    with pytest.raises(InvalidInputError):
        image_uncertainty(model, read_image(f))


def test_disagreement_score(model):
    d = saliency_seg_disagreement(model, read_image(sample_studies_dir() / "mri2d_0102.jpg"))
    assert 0.0 <= d["score"] <= 1.0 and 0.0 <= d["dice"] <= 1.0
    assert d["score"] == pytest.approx(d["p_tumour"] * (1 - d["dice"]), abs=1e-6)


def test_item_arrays_2d_and_volume(dev2d, tmp_path):
    x, m, y = item_arrays(dev2d / "images" / "1941.jpg", dev2d / "masks" / "1941.png", "glioma", 64)
    assert x.shape == m.shape == (1, 64, 64) and x.dtype == np.uint8 and m.any() and y.tolist() == [0]
    import nibabel as nib

    ref = nib.load(sample_studies_dir() / "brats_t1c_0001.nii.gz")
    lab = np.zeros(ref.shape, np.uint8)
    lab[30:50, 40:60, 30:45] = 1
    f = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(lab, ref.affine), f)
    x, m, y = item_arrays(sample_studies_dir() / "brats_t1c_0001.nii.gz", f, "glioma", 64)
    assert len(x) == len(m) == len(y) <= 12
    assert (y == 0).sum() == 8 and (y == 3).sum() == len(y) - 8  # lesion slices glioma, the rest tumour-free
    assert all(m[i].any() for i in np.where(y == 0)[0]) and not m[y == 3].any()
    # a lesion whose end slices hold specks: those slices vanished at the network's size and trained "glioma" with
    # an empty mask ("1 tumour image(s) without an outline" for a volume outlined on 74 slices; session 39 probe)
    lab[..., 29] = 0
    lab[35, 45, 29] = lab[35, 45, 45] = 1
    nib.save(nib.Nifti1Image(lab, ref.affine), f)
    x, m, y = item_arrays(sample_studies_dir() / "brats_t1c_0001.nii.gz", f, "glioma", 64)
    assert (y == 0).sum() >= 6 and all(m[i].any() for i in np.where(y == 0)[0])
    bad = tmp_path / "bad.png"
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    with pytest.raises(InvalidInputError, match="does not match"):
        read_label_like(bad, read_image(dev2d / "images" / "1941.jpg"))
    # a colour picture of the right size was stored as it came and served back in colour (session 39 probe)
    mask = np.asarray(Image.open(dev2d / "masks" / "1941.png"))
    Image.fromarray(np.stack([mask] * 3, axis=-1)).save(tmp_path / "rgb.png")
    with pytest.raises(InvalidInputError, match="one value per pixel; this one stores RGB"):
        read_label_like(tmp_path / "rgb.png", read_image(dev2d / "images" / "1941.jpg"))
    Image.fromarray(mask).convert("P").save(tmp_path / "indexed.png")
    assert read_label_like(tmp_path / "indexed.png", read_image(dev2d / "images" / "1941.jpg")).any()
    with pytest.raises(InvalidInputError, match="unknown class"):
        item_arrays(dev2d / "images" / "1941.jpg", None, "astrocytoma", 64)


def test_finetune_changes_a_copy_and_versions_publish_atomically(model, dev2d, tmp_path):
    xs = [item_arrays(dev2d / "images" / f"{i}.jpg", dev2d / "masks" / f"{i}.png", c, model.image_size)
          for i, c in (("1941", "glioma"), ("0102", "meningioma"))]
    images, masks, labels = (np.concatenate([t[k] for t in xs]) for k in range(3))
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    net, hist = finetune(model, images, masks, labels, epochs=1, lr=1e-3, progress=False)
    assert len(hist) == 1 and hist[0]["samples"] == 2 and np.isfinite(hist[0]["loss"])
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())  # serving copy untouched
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in before.items() if v.is_floating_point())
    mv = ModelVersions(tmp_path / "models", model.path)
    assert mv.current_path() == model.path and mv.versions() == []
    # a half-written version (killed run) is swept and never current
    (tmp_path / "models" / ".incoming-x").mkdir()
    (tmp_path / "models" / ".incoming-x" / CHECKPOINT).write_bytes(b"partial")
    assert mv.sweep() == 1 and mv.current_path() == model.path
    folder = mv.publish(net, model.config, dict(model.card))
    assert folder.name == "v0001" and mv.current_path() == folder
    assert json.loads((folder / CARD).read_text())["version"] == "v0001"
    assert mv.load().version == "v0001"
    assert mv.publish(net, model.config, dict(model.card)).name == "v0002"
    # a pointer to a folder without a complete checkpoint falls back to the base model
    (tmp_path / "models" / "current.json").write_text(json.dumps({"folder": "v0009"}))
    assert mv.current_path() == model.path


def test_a_mask_saved_without_its_class_trains_the_seg_head_only(model, dev2d):
    """3D Slicer's MONAILabel module saves the mask of its "tumor" segment with no class: it used to be
    skipped by training. Its outline now trains the seg head; the classifier is left as it was."""
    from tumorlens.activelearning.finetune import UNKNOWN_CLASS

    x, m, y = item_arrays(dev2d / "images" / "1941.jpg", dev2d / "masks" / "1941.png", None, model.image_size)
    assert y.tolist() == [UNKNOWN_CLASS] and m.any()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    net, hist = finetune(model, x, m, y, epochs=1, lr=1e-3, progress=False)
    assert np.isfinite(hist[0]["loss"]) and hist[0]["loss"] > 0
    after = net.state_dict()
    changed = {k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])}
    assert any(k.startswith("decoder.") for k in changed)
    assert not any(k.startswith("classifier.") for k in changed)
    # with its class the same slice trains the classifier too
    net2, _ = finetune(model, x, m, np.array([CLASS_NAMES.index("glioma")]), epochs=1, lr=1e-3, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in net2.state_dict().items() if k.startswith("classifier."))
    # a mask with no class and nothing drawn holds nothing to learn
    with pytest.raises(InvalidInputError, match="nothing to learn"):
        item_arrays(dev2d / "images" / "1941.jpg", None, None, model.image_size)


def test_a_damaged_current_version_is_replaced_by_the_newest_that_loads(model, tmp_path):
    """A truncated checkpoint of the current version made every inference a bare 500 while /info/ named it;
    the newest earlier version that loads answers now, and says so. A pointer half-written by a killed run
    (``atomic_write``'s temporary name) is swept at start."""
    mv = ModelVersions(tmp_path / "models", model.path)
    mv.publish(model.net, model.config, dict(model.card))
    v2 = mv.publish(model.net, model.config, dict(model.card))
    assert mv.load().version == "v0002" and mv.served == "v0002" and mv.broken is None
    ckpt = v2 / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert mv.load().version == "v0001" and mv.served == "v0001" and "v0002" in mv.broken
    (tmp_path / "models" / "v0001" / CHECKPOINT).write_bytes(b"")
    base = mv.load()
    assert mv.served is None and base.path == model.path
    (tmp_path / "models" / ".tmp-abc123-current.json").write_text("{}")
    mv.sweep()
    assert not list((tmp_path / "models").glob(".tmp-*"))


def test_serve_cli_errors_and_sample_copy(tmp_path, capsys):
    from tumorlens.cli import main

    assert main(["serve", "--studies", str(tmp_path / "nope")]) == 2
    assert "studies folder does not exist" in capsys.readouterr().err
    import socket

    with socket.socket() as busy:  # a port another server holds: said at once, before any model is loaded
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        (tmp_path / "s").mkdir()
        assert main(["serve", "--studies", str(tmp_path / "s"), "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    from tumorlens.serving.cli import prepare_sample_studies

    before = {p.name: p.stat().st_mtime for p in sample_studies_dir().iterdir()}
    d = prepare_sample_studies(tmp_path / "copy")
    assert sorted(p.name for p in d.iterdir()) == sorted(before)
    (d / "labels").mkdir()
    prepare_sample_studies(d)  # again: keeps what is there
    assert (d / "labels").is_dir()
    assert {p.name: p.stat().st_mtime for p in sample_studies_dir().iterdir()} == before
    # MONAI Label's logging config lives beside its log (without one every start left a copy in /tmp), one log
    # per datastore in the work folder (every server of the checkout had shared monai_app/logs/app.log)
    from tumorlens.serving.cli import server_command

    cmd, env = server_command(str(d), "127.0.0.1", 8999, workdir=tmp_path / "wd")
    conf = Path(cmd[cmd.index("--log_config") + 1])
    assert conf.parent.parent == tmp_path / "wd" / "logs" and str(conf.parent / "app.log") in conf.read_text()
    assert env["TUMORLENS_LOG_FILE"] == str(conf.parent / "app.log")
    other, _ = server_command(str(tmp_path / "s"), "127.0.0.1", 8999, workdir=tmp_path / "wd")
    assert Path(other[other.index("--log_config") + 1]).parent != conf.parent
    # a DICOMweb server's log and work folder lie in a folder, not under "http:/..." in the current one
    from tumorlens.serving.process import ServerProcess

    srv = ServerProcess("http://127.0.0.1:8042/dicom-web", port=8999)
    assert srv.log_path.is_absolute() and "http:" not in str(srv.workdir)
    # MONAI Label's server with this Python, not its bash launcher (which split a path with a space in two)
    assert cmd[:3] == [sys.executable, "-m", "monailabel.main"] and cmd[cmd.index("--studies") + 1] == str(d)


def _two_items(model, dev2d):
    xs = [item_arrays(dev2d / "images" / f"{i}.jpg", dev2d / "masks" / f"{i}.png", c, model.image_size)
          for i, c in (("1941", "glioma"), ("0102", "meningioma"))]
    return [np.concatenate([t[k] for t in xs]) for k in range(3)]


def test_finetune_that_diverges_publishes_nothing(model, dev2d, tmp_path):
    from tumorlens.errors import TrainingDivergedError

    images, masks, labels = _two_items(model, dev2d)
    with pytest.raises(TrainingDivergedError, match="smaller lr"):
        finetune(model, images, masks, labels, epochs=2, lr=1e30, progress=False, trainable="all")
    bad = finetune(model, images, masks, labels, epochs=1, lr=1e-4, progress=False)[0]
    with torch.no_grad():
        next(p for p in bad.decoder.parameters()).fill_(float("nan"))
    mv = ModelVersions(tmp_path / "models", model.path)
    with pytest.raises(TrainingDivergedError, match="not finite"):
        mv.publish(bad, model.config, dict(model.card))
    assert mv.versions() == [] and mv.current_path() == model.path
    with pytest.raises(InvalidInputError, match="trainable"):
        finetune(model, images, masks, labels, progress=False, trainable="decoder")


def test_finetune_keeps_text_head_and_familiarity_when_encoder_frozen(model, dev2d, tmp_path):
    from tumorlens.activelearning.heads import carried_heads, write_heads
    from tumorlens.alignment.api import ALIGNMENT_FILE, PROBE_FILE, load_alignment
    from tumorlens.inference import Predictor
    from tumorlens.models.registry import load_model

    images, masks, labels = _two_items(model, dev2d)
    has_mask = np.array([True, False])  # the second: a class given without an outline
    net, _ = finetune(model, images, masks, labels, epochs=1, lr=1e-3, progress=False, has_mask=has_mask)
    heads = carried_heads(model, net, images, labels)
    assert set(heads) == {ALIGNMENT_FILE, PROBE_FILE}
    base_head = load_alignment(model)
    n0, n1 = len(base_head.cache.labels), len(heads[ALIGNMENT_FILE].cache.labels)
    # a labelled image that is already a key (here one of the two is a training image) is not added again
    assert n0 < n1 <= n0 + len(labels) and heads[ALIGNMENT_FILE].meta["cache_added"] == n1 - n0
    assert torch.equal(heads[ALIGNMENT_FILE].classifier.weight, net.classifier[-1].weight.detach().float())
    folder = ModelVersions(tmp_path / "models", model.path).publish(
        net, model.config, dict(model.card), extra=lambda f, v: write_heads(heads, f, v))
    v1 = load_model(folder)
    p = Predictor(v1)
    assert p.decision == "aligned" and p.familiarity_calibration == base_head.meta["familiarity"]
    res = p.predict(read_image(dev2d / "images" / "1941.jpg"))
    assert res.extra.get("familiarity") is not None
    # the next relabel cycle from that version: the same images keep one key each; a new class relabels it
    again = carried_heads(v1, v1.net, images, labels)
    assert len(again[ALIGNMENT_FILE].cache.labels) == n1 and again[ALIGNMENT_FILE].meta["cache_added"] == 0
    swapped = carried_heads(v1, v1.net, images, labels[::-1].copy())
    assert swapped[ALIGNMENT_FILE].meta["cache_relabelled"] == 2
    # the encoder fine-tuned too: its features changed, so no head describes them any more
    net_all, _ = finetune(model, images, masks, labels, epochs=1, lr=1e-3, progress=False, trainable="all")
    assert carried_heads(model, net_all, images, labels) == {}


def test_label_class_must_agree_with_its_outline():
    from tumorlens.activelearning.finetune import check_label_class

    drawn = np.zeros((8, 8), np.uint8)
    drawn[2:4, 2:4] = 1
    with pytest.raises(InvalidInputError, match="outlines 4 voxels"):
        check_label_class(drawn, "no_tumor", "x.png", volume=False)
    with pytest.raises(InvalidInputError, match="needs its tumour outlined"):
        check_label_class(np.zeros((8, 8, 4)), "glioma", "x.nii.gz", volume=True)
    check_label_class(np.zeros((8, 8)), "glioma", "x.png", volume=False)  # a class without an outline
    check_label_class(drawn, "glioma", "x.png", volume=False)


def test_identifier_like_ids_and_log_lines():
    import logging

    from tumorlens.findings.identifiers import identifier_kinds_in_name

    assert identifier_kinds_in_name("Smith_John_19700101") == ["date"]
    assert identifier_kinds_in_name("Smith_John_1970_01_01") == ["date"]
    assert identifier_kinds_in_name("John.Smith@example.org") == ["email"]
    assert identifier_kinds_in_name("mrn1234567") == identifier_kinds_in_name("MRN_1234567") == ["identifier"]
    assert identifier_kinds_in_name("Patient_John_Smith") == ["name"]
    assert identifier_kinds_in_name("DOE^JANE^MARIE") == ["name"]  # DICOM's person-name form
    # ids people and tools really use: sample names, Slicer's hashed ids, BIDS, BraTS, DICOM UIDs, study codes
    for ok in ("mri2d_0102", "img-19700101abcdef12", "sub-01_T1w", "BraTS2021_00000", "3: T2 FLAIR",
               "1.2.840.113619.2.55.3.604688119", "202611300311", "ID_0001", "case_id_12", "Subject ID 7",
               "Accession_7", "Patient_Anon", "patient001", "scan_2024", "TCGA-02-0003"):
        assert identifier_kinds_in_name(ok) == [], ok
    import importlib.util
    import sys

    from tumorlens.paths import project_root

    spec = importlib.util.spec_from_file_location("log_redaction", project_root() / "monai_app" / "lib"
                                                  / "log_redaction.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["log_redaction"] = mod
    spec.loader.exec_module(mod)
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "PUT %s 400", ("/datastore/image?image=Smith_John_1970-01-01",),
                            None)
    assert mod.RedactIdentifiers().filter(rec) and "1970" not in rec.getMessage() and "400" in rec.getMessage()
    for line, gone in (("Image: MRN_1234567; File: x", "1234567"), ("Image: Patient_John_Smith", "John")):
        rec = logging.LogRecord("x", logging.INFO, __file__, 1, line, (), None)
        assert mod.RedactIdentifiers().filter(rec) and gone not in rec.getMessage(), rec.getMessage()
    # only the words that hold an identifier are rewritten: the line's paths and keys keep their '_' and '.'
    line = "upload Doe_19580214.nii.gz to /tmp/probe_vol/work; client_id='a_b'"
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, line, (), None)
    assert mod.RedactIdentifiers().filter(rec) and "19580214" not in rec.getMessage()
    assert "/tmp/probe_vol/work" in rec.getMessage() and "client_id='a_b'" in rec.getMessage(), rec.getMessage()
    # the whole id goes, not only its date or number: the name beside them is a name too
    for line in ("Image: Doe_Jane_MRN48213977; File: UploadFile(filename='Doe_Jane_MRN48213977.dcm')",
                 "Image: Doe_Jane_19640312; File: x", "Image: DOE^JANE^MARIE; File: x"):
        rec = logging.LogRecord("x", logging.INFO, __file__, 1, line, (), None)
        assert mod.RedactIdentifiers().filter(rec) and not {"Doe", "Jane", "DOE", "JANE"} & set(
            re.findall(r"[A-Za-z]+", rec.getMessage())), rec.getMessage()
    # patient context in a logged request is never written, valid or refused (a refused history was, verbatim)
    line = ("Infer Request: {'model': 'report', 'backend': 'template', 'patient': {'clinical_history': "
            "'NHS number 943 476 5919, headaches'}, 'patient_name': 'Jane Doe'}")
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, line, (), None)
    assert mod.RedactIdentifiers().filter(rec) and "943" not in rec.getMessage() and "Jane" not in rec.getMessage()
    assert "'model': 'report'" in rec.getMessage(), rec.getMessage()
    stamp = "[2026-11-30 10:49:36,679] scoring done for mri2d_0102"  # a log's own timestamp stays
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, stamp, (), None)
    assert mod.RedactIdentifiers().filter(rec) and rec.getMessage() == stamp


def test_train_stats_of_a_run_whose_process_is_gone():
    import importlib.util
    import subprocess
    import sys
    from datetime import UTC, datetime, timedelta

    from tumorlens.paths import project_root

    app = project_root() / "monai_app"
    sys.path.insert(0, str(app))
    try:
        spec = importlib.util.spec_from_file_location("tl_finetune_trainer", app / "lib" / "trainers" / "finetune.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(app))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert mod.run_gone({"status": "RUNNING", "pid": int(done.stdout)})  # killed with DELETE /train/
    import os

    assert not mod.run_gone({"status": "RUNNING", "pid": os.getpid()})
    now = datetime.now(UTC)
    assert not mod.run_gone({"status": "STARTING", "requested_at": now.isoformat()})
    assert mod.run_gone({"status": "STARTING", "requested_at": (now - timedelta(minutes=5)).isoformat()})
