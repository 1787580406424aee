"""The findings record: round-trips, refuses bad records, and its JSON Schema file is current."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from tumorlens.errors import InvalidInputError
from tumorlens.findings import (
    SCHEMA_FILE,
    SCHEMA_VERSION,
    Findings,
    build_findings,
    json_schema,
    mask_info,
)


def _record() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "input": {"file": "0001.jpg", "modality": "MR", "kind": "image2d", "dims": [512, 512],
                  "spacing_mm": [1.0, 1.0], "spacing_known": False},
        "classification": {"label": "glioma",
                           "probabilities": {"glioma": 0.7, "meningioma": 0.2, "pituitary": 0.05, "no_tumor": 0.05},
                           "uncertainty": {"entropy": 0.87, "method": "softmax_entropy"}},
        "masks": [{"source": "saliency:gradcampp", "empty": False, "voxels": 120, "area_mm2": 120.0,
                   "volume_mm3": None, "bbox": {"min": [10, 12], "max": [20, 25]}},
                  {"source": "segmentation_head", "empty": True, "voxels": 0, "area_mm2": 0.0,
                   "volume_mm3": None, "bbox": None}],
        "saliency": {"method": "gradcampp", "percentile": 93.5, "threshold": 0.41, "rule": "entropy"},
        "regions": [
            {"label": "Left_Insular_Cortex", "name": "insular cortex", "hemisphere": "left",
             "fraction": 0.6, "max_probability": 81.0},
            {"label": "Unlabelled_White_Matter_Or_Other", "name": "white matter / unlabelled",
             "hemisphere": "left", "fraction": 0.4, "max_probability": 0.0},
        ],
        "lesion": {"centroid_mni_mm": [-38.0, 4.0, 2.0], "laterality": "left", "crosses_midline": False,
                   "mask_source": "saliency:gradcampp"},
        "placement": {"method": "template_slice", "quality": 0.8, "confidence": 0.9, "low_confidence": False,
                      "details": {"template_z_mm": 2.0}},
        "notes": [],
        "patient": {"age": 54, "sex": "F", "clinical_history": "headaches for three weeks"},
        "text_matches": [],
        "provenance": {"model": "tumorlens-densenet121", "model_version": "1", "config_hash": "abc",
                       "tumorlens_version": "0.1.0", "created_at": "2026-11-24T22:00:00+00:00"},
    }


def test_round_trip(tmp_path):
    f = Findings.model_validate(_record())
    path = f.save(tmp_path / "sub" / "findings.json")
    back = Findings.load(path)
    assert back == f
    assert json.loads(path.read_text())["classification"]["label"] == "glioma"
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves nothing behind


def test_schema_file_is_current():
    assert SCHEMA_FILE.is_file(), "run: python -m tumorlens.findings.schema"
    assert json.loads(SCHEMA_FILE.read_text()) == json.loads(json.dumps(json_schema(), sort_keys=True)), \
        "findings.schema.json is stale: run python -m tumorlens.findings.schema"


def _mutate(path: str, value):
    rec = copy.deepcopy(_record())
    *head, last = path.split(".")
    d = rec
    for k in head:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return rec


@pytest.mark.parametrize("path,value,why", [
    ("classification.label", "astrocytoma", "unknown label"),
    ("classification.label", "meningioma", "is not the most probable class"),
    ("classification.probabilities", {"glioma": 0.7, "meningioma": 0.2, "pituitary": 0.2, "no_tumor": 0.05},
     "sum to"),
    ("classification.probabilities", {"glioma": 0.7, "meningioma": 0.3}, "exactly the classes"),
    ("regions.0.fraction", 1.4, "less than or equal to 1"),
    ("regions.1.fraction", -0.1, "greater than or equal to 0"),
    ("patient", {"age": 54, "name": "Jane Doe"}, "identifiers"),
    ("patient", {"age": 54, "patient_id": "P123"}, "identifiers"),
    ("patient", {"age": 54, "date_of_birth": "1970-01-01"}, "identifiers"),
    ("patient.clinical_history", "MRN: 12345, seizures", "identifier"),
    ("patient.clinical_history", "seen on 03/04/2021", "identifier"),
    # free-form identifiers a probe got through: no ':' after the keyword, month names, bare 7-digit numbers
    ("patient.clinical_history", "Patient John Smith, ID A1234567, right-sided headache", "identifier"),
    ("patient.clinical_history", "MRN 00123456, seizures", "identifier"),
    ("patient.clinical_history", "DOB 1 January 1970. Headache.", "identifier"),
    ("patient.clinical_history", "Jane Doe, born in Leeds, seizures", "identifier"),
    ("patient.clinical_history", "hospital number 4471093", "identifier"),
    # what a probe got through in session 36: an address, "Patient:" with a colon, names in other scripts,
    # control characters, an age of true or "45"
    ("patient.clinical_history", "lives at 221B Baker Street, London NW1 6XE; headaches", "identifier"),
    ("patient.clinical_history", "headaches, referred by GP. Patient: Brynhild Oddsson", "identifier"),
    ("patient.clinical_history", "пациент Иван Петров, головная боль", "script other than Latin"),
    ("patient.clinical_history", "患者 王小明, 头痛两周", "script other than Latin"),
    ("patient.clinical_history", "headache\x00\x1b[31m", "control"),
    ("patient.clinical_history", "headaches\u200bJohn", "invisible"),
    ("patient.clinical_history", "Γιώργος Παπαδόπουλος, headaches", "script other than Latin"),
    ("patient.clinical_history", "SMITH^JOHN^^^ headaches", "identifier"),
    ("patient.age", True, "valid integer"),
    ("patient.age", "45", "valid integer"),
    ("classification.uncertainty.entropy", 0.01, "not the entropy of the probabilities"),
    ("lesion.crosses_midline", True, "every region lies in the"),
    ("notes", ["a sagittal slice does not show which hemisphere it is from: side reported as unknown"], "sagittal"),
    ("input.file", "/data/smith_john/0001.jpg", "basename"),
    ("classification.uncertainty.entropy", 50.0, "exceeds ln(4)"),  # hand-edited records a probe made
    ("masks.0.voxels", 10 ** 12, "the image has 262144"),
    ("masks.0.bbox", {"min": [10, 12], "max": [20, 900]}, "outside the image"),
    ("masks.0.empty", True, "empty=True"),
    ("masks.0.source", "saliency:lime", "source"),
    ("saliency.method", "lime", "method"),
    ("regions.0.hemisphere", "top", "hemisphere"),
    ("schema_version", "2.0", "not compatible"),
    ("provenance.created_at", "yesterday", "ISO 8601"),
])
def test_rejects_bad_records(path, value, why):
    with pytest.raises(InvalidInputError) as e:
        Findings.from_dict(_mutate(path, value), source="findings.json")
    assert why in str(e.value)
    assert "findings.json" in str(e.value)


def test_rejects_extra_fields_and_unsorted_regions():
    rec = _record()
    rec["classification"]["confidence"] = 0.7
    with pytest.raises(InvalidInputError, match="Extra inputs"):
        Findings.from_dict(rec)
    rec = _record()
    rec["regions"].reverse()
    with pytest.raises(InvalidInputError, match="sorted by fraction"):
        Findings.from_dict(rec)


@pytest.mark.parametrize("edit,why", [
    (lambda r: r["regions"][0].update(label="Right_Banana_Gyrus", name="banana gyrus", hemisphere="right"),
     "not a Harvard-Oxford atlas label"),
    (lambda r: r["regions"][0].update(name="thalamus"), "is named 'thalamus'"),
    (lambda r: r["regions"][0].update(hemisphere="right"), "lies in the left hemisphere"),
    (lambda r: (r["regions"][0].update(label="Right_Insular_Cortex", hemisphere="right"),
                r["regions"][1].update(hemisphere="right")), "laterality is 'left'"),
    # fields that must agree with each other (session 35 probe: such records were reported as verified)
    (lambda r: r["lesion"].update(centroid_mni_mm=[40.0, 4.0, 2.0]), r"centroid lies at x = \+40.0 mm"),
    (lambda r: r["lesion"].update(mask_source="saliency:scorecam"), "names no mask of the record"),
    (lambda r: r["saliency"].update(method="scorecam"), "has no mask in the record"),
    (lambda r: r["input"].update(spacing_known=True, spacing_mm=[0.5, 0.5]),
     "area_mm2 is 120 but pixels x pixel area give 30"),
    (lambda r: (r["input"].update(kind="volume", dims=[64, 64, 32], spacing_mm=[2.0, 2.0, 2.0], spacing_known=True),
                r["masks"][0].update(area_mm2=None, volume_mm3=9600.0, bbox={"min": [1, 1, 1], "max": [5, 5, 5]}),
                r["masks"][1].update(area_mm2=None, volume_mm3=0.0)), "volume_mm3 is 9600 but voxels x voxel volume give 960"),
])
def test_regions_must_be_the_atlas_own_and_agree_with_the_lesion_side(edit, why):
    """A hand-edited record cannot invent a region, rename one or move it to the other side: the
    report would name it and the verifier checks the report against the record."""
    rec = _record()
    edit(rec)
    with pytest.raises(InvalidInputError, match=why):
        Findings.from_dict(rec)


def test_low_confidence_placement_names_no_regions():
    rec = _record()
    rec["placement"]["low_confidence"] = True
    with pytest.raises(InvalidInputError, match="regions must be empty"):
        Findings.from_dict(rec)
    rec["regions"] = []
    with pytest.raises(InvalidInputError, match="note"):
        Findings.from_dict(rec)
    rec["notes"] = ["slice matched no template plane well (confidence 0.2)"]
    assert Findings.from_dict(rec).regions == []


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInputError, match="broken.json"):
        Findings.load(bad)
    with pytest.raises(InvalidInputError, match="does not exist"):
        Findings.load(tmp_path / "missing.json")


def test_build_findings_on_a_real_image(dev2d, tumour_rows, tmp_path):
    from tumorlens.data import read_image, read_mask

    row = tumour_rows[0]
    img = read_image(dev2d / row["image"])
    truth = read_mask(dev2d / row["mask"], like=img).numpy()[0]
    probs = {"glioma": 0.1, "meningioma": 0.6, "pituitary": 0.2, "no_tumor": 0.1}
    f = build_findings(img, probs, masks=[("segmentation_head", truth)], notes=["regions not computed"],
                       patient={"age": 40, "sex": "M"})
    assert f.input.file == row["image"].split("/")[-1]
    assert f.input.dims == list(truth.shape) and f.input.kind == "image2d"
    assert f.classification.label == "meningioma"
    assert 0 < f.classification.uncertainty.entropy < np.log(4)
    m = f.masks[0]
    # a JPEG has no pixel size: no area in mm2 (the pixel count had been stated as one)
    assert not f.input.spacing_known and m.voxels == int(truth.sum()) and m.area_mm2 is None and m.volume_mm3 is None
    ys, xs = np.nonzero(truth)
    assert m.bbox.min == [int(ys.min()), int(xs.min())] and m.bbox.max == [int(ys.max()), int(xs.max())]
    assert Findings.load(f.save(tmp_path / "f.json")) == f
    import shutil

    named = tmp_path / "Smith_John_1970-01-01.jpg"  # a file named after its patient keeps no name in the record
    shutil.copy(dev2d / row["image"], named)
    g = build_findings(read_image(named), probs, masks=[("segmentation_head", truth)], notes=["regions not computed"])
    assert g.input.file == "image.jpg" and "Smith" not in g.to_json() and "1970" not in g.to_json()


def test_mask_info_volume_units():
    m = np.zeros((4, 5, 6), np.uint8)
    m[1:3, 2:4, 3] = 1
    info = mask_info(m, "segmentation_head", [1.0, 2.0, 3.0], "volume")
    assert info.voxels == 4 and info.volume_mm3 == 24.0 and info.area_mm2 is None
    assert info.bbox.min == [1, 2, 3] and info.bbox.max == [2, 3, 3]
    empty = mask_info(np.zeros((3, 3)), "saliency:gradcam", [1.0, 1.0], "image2d")
    assert empty.empty and empty.bbox is None and empty.area_mm2 == 0.0
    # a volume file of one slice is read as a 2D slice: its lesion is an area, not area x thickness
    one = np.zeros((6, 1, 5), np.uint8)
    one[2:4, 0, 1:4] = 1
    info = mask_info(one, "segmentation_head", [0.5, 5.0, 2.0], "volume")
    assert info.area_mm2 == 6 * 0.5 * 2.0 and info.volume_mm3 is None and info.bbox.max == [3, 0, 3]


def test_provenance_names_the_code_that_wrote_the_record():
    """Records written by different code of the same version (0.1.0, same model and config) had been
    indistinguishable (session 35 probe); and a record of schema 1.3, without the field, still loads."""
    import shutil
    import subprocess

    from tumorlens.findings.build import provenance
    from tumorlens.paths import project_root

    if shutil.which("git") is None or not (project_root() / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_root(), capture_output=True,
                          text=True).stdout.strip()
    assert provenance().code_commit.split("-")[0] == head
    old = _record()
    old["schema_version"] = "1.3"
    assert Findings.from_dict(old).provenance.code_commit is None


@pytest.mark.parametrize("history,ok", [
    ("Anna Meier reports headaches", False),  # a plain name needs no title to be one (session 39 audit)
    ("Headaches; seen by the family of Jan Kowalski", False),
    ("New seizures. Known breast cancer, Cushing syndrome and Parkinson's disease.", True),
    ("Headache since March, MRI with FLAIR change", True),
])
def test_a_clinical_history_with_a_plain_name_is_refused(history, ok):
    from pydantic import ValidationError

    from tumorlens.findings.schema import Patient

    if ok:
        assert Patient(clinical_history=history).clinical_history == history
    else:
        with pytest.raises(ValidationError, match="may be a name"):
            Patient(clinical_history=history)
