"""Common part of every tumorlens infer task: read the image with tumorlens' readers, run one
core call under the current model version, write the label file on the input's own geometry.

MONAI Label's ``BasicInferTask`` pipeline (LoadImage -> transforms -> writer) would re-read images
with other conventions (2D arrays transposed, affine from the prediction); tumorlens already returns
masks on the input grid, so these tasks implement ``InferTask`` directly and write the label file
themselves: a PNG the size of a JPEG/PNG input (pixel (row, col) over pixel (row, col)), and a NIfTI
(or NRRD) with the input's affine for volumes and DICOM images.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.errors import bad_request, check_id
from lib.scoring.scores import record_unusable
from lib.state import AppState
from tumorlens.data.readers import PHOTO_EXT, is_volume, read_image
from tumorlens.errors import InvalidInputError, TumorlensError
from tumorlens.findings.identifiers import safe_file_name

logger = logging.getLogger(__name__)
LABEL_EXTENSIONS = (".png", ".nii.gz", ".nii", ".nrrd")


def describe_source(request: dict) -> str:
    """How to name the input in an error: the datastore id, or 'uploaded file'."""
    return request.get("image_id") or "uploaded file"


def public_problem(err: InvalidInputError, path: str, request: dict) -> str:
    """``err``'s problem as the client may see it: a reader's message can quote the file's path (nibabel's
    "Cannot work out file type of ..."), and for an upload that is the server's temporary file, which
    tells the client nothing and shows the server's file system. The path becomes the image's name."""
    name = request.get("image_id") or "the uploaded file"
    problem = err.problem
    for p in sorted({str(path), str(Path(path).resolve()), err.path or ""} - {""}, key=len, reverse=True):
        problem = problem.replace(p, name)
    return problem


def default_extension(img: MetaTensor) -> str:
    src = str(img.meta.get("filename_or_obj", "")).lower()
    if not is_volume(img) and src.endswith(PHOTO_EXT):
        return ".png"
    return ".nii.gz"


LABEL_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


# keys a client may use for patient context outside params.patient (which alone is read): a 400 says where it goes
STRAY_PATIENT_KEYS = {"age", "sex", "gender", "clinical_history", "history", "indication", "patient_age", "patient_sex",
                      "dob", "date_of_birth", "birth_date", "patient_name", "name", "patient_id"}


def patient_param(request: dict) -> dict | None:
    """``params.patient`` (age, sex, clinical_history) checked before any work: a 400 naming the field, never
    quoting the value (a value refused as an identifier is one). Context sent under other keys ("age",
    "clinical_history" at the top level) went unread with a 200: those are a 400 pointing here."""
    stray = [k for k in request if isinstance(k, str) and k != "patient" and k.lower().replace("-", "_") in STRAY_PATIENT_KEYS]
    if stray:
        raise bad_request(f"{', '.join(stray)}: patient context goes in params.patient, e.g. "
                          '{"patient": {"age": 54, "sex": "F", "clinical_history": "headaches"}}')
    patient = request.get("patient")
    if patient is None:
        return None
    if isinstance(patient, str):
        try:
            patient = json.loads(patient)
        except ValueError as e:
            raise bad_request("params.patient is not JSON: give an object with age, sex, clinical_history") from e
    if not isinstance(patient, dict):  # "61 M" is JSON text, not an object
        raise bad_request("params.patient must be an object with age, sex, clinical_history")
    from tumorlens.errors import InvalidInputError
    from tumorlens.findings.schema import check_patient

    try:
        return check_patient(patient)
    except InvalidInputError as e:
        raise bad_request(f"params.patient: {e.problem}") from e


def flag(request: dict, key: str, default: bool) -> bool:
    """A yes/no request field: true/false (JSON or text), 1/0, yes/no, on/off; anything else is a 400 (a
    "no" read as true kept running the atlas step it was meant to skip)."""
    value = request.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise bad_request(f"{key} must be true or false, got {value!r}"[:200])


def label_format(request: dict) -> tuple[str | None, bool]:
    """MONAI Label's ``result_dtype`` and ``result_compress`` (OHIF sends ``uint16`` and ``false`` and reads the
    NRRD's bytes as that, uncompressed): the label type asked for (None: the task's own) and whether to
    compress an NRRD (default yes)."""
    dtype = request.get("result_dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype.lower() not in LABEL_DTYPES):
        raise bad_request(f"result_dtype {dtype!r} not supported for labels: one of {', '.join(LABEL_DTYPES)}")
    return (dtype.lower() if dtype else None), flag(request, "result_compress", True)


def write_label(arr: np.ndarray, img: MetaTensor, ext: str, dtype=np.uint8, compress: bool = True) -> str:
    """Write a label (or heatmap) array on ``img``'s grid; returns the temporary file's path."""
    arr = np.asarray(arr)
    out = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
    if ext == ".png":
        if is_volume(img):
            raise bad_request("a PNG label needs a 2D image; ask for .nii.gz or .nrrd")
        from PIL import Image

        Image.fromarray(arr.astype(np.uint8)).save(out)
        return out
    affine = np.asarray(img.affine, dtype=float)
    data = arr if is_volume(img) else arr[..., None]  # 2D: (row, col, 1) with the (row, col, 0) affine
    if ext in (".nii.gz", ".nii"):
        nimg = nib.Nifti1Image(data.astype(dtype), affine)
        nimg.header.set_xyzt_units("mm")
        nib.save(nimg, out)
        return out
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.transpose(data.astype(dtype), (2, 1, 0)).copy())
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    sitk.WriteImage(image, out, compress)
    return out


class TumorlensInfer(InferTask):
    """Subclasses implement ``run(img, request) -> (label array | None, result json)``."""

    returns_label = True  # False: the task never writes a label file (output=image is refused)
    # the task reads nothing but the image: its refusal of a datastore image (constant, no brain, unreadable) is
    # every model's, so it is recorded where the strategies look (``lib.scoring.scores.unusable``). The random
    # strategy had handed such an upload back until a scoring run met it (an outside probe, session 39)
    image_only = False

    def __init__(self, state: AppState, type: InferType | str, labels: dict[str, int], dimension: int,
                 description: str, config: dict[str, Any] | None = None):
        super().__init__(type=type, labels=labels, dimension=dimension, description=description, config=config)
        self.state = state

    def is_valid(self) -> bool:
        try:
            self.state.versions.current_path()
            return True
        except TumorlensError as e:
            logger.error(f"model not available: {e}")
            return False

    def get_path(self, validate: bool = True) -> str | None:
        """The checkpoint this task runs now (``GET /model/{model}`` downloads it, ``/model/info/{model}``
        gives its checksum); uploading or deleting it through ``/model`` is refused (request_checks)."""
        from tumorlens.models.registry import CHECKPOINT

        try:
            path = self.state.versions.current_path() / CHECKPOINT
        except TumorlensError:
            return None
        return str(path) if path.is_file() or not validate else None

    def _unusable(self, req: dict, path: str, problem: str) -> None:
        """Record a datastore image no model can read, for as long as its file is unchanged."""
        image_id = req.get("image_id")
        if not image_id or not os.path.isfile(path):
            return  # an upload or a session image: not the datastore's
        try:
            record_unusable(self.state, image_id, problem, os.path.getmtime(path))
        except (OSError, TumorlensError) as e:  # the record is a help to the strategies, never a reason to fail
            logger.warning(f"could not record {image_id} as unusable: {e}")

    @abstractmethod
    def run(self, img: MetaTensor, request: dict) -> tuple[np.ndarray | None, dict]:
        """The task's own work on one image: (label array or None, JSON params)."""

    def label_names(self, result: dict) -> dict[str, int]:
        return dict(self.labels) if isinstance(self.labels, dict) else {}

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        t0 = time.time()
        req = dict(self.config())
        req.update(request)
        path = req.get("image")
        if not isinstance(path, str) or not path:
            raise bad_request("no image: give a datastore image id or send a file")
        src = describe_source(req)
        try:
            img = read_image(path)
        except InvalidInputError as e:
            self._unusable(req, path, public_problem(e, path, req))
            raise bad_request(f"{src}: {public_problem(e, path, req)}") from e
        ext = req.get("result_extension") or default_extension(img)
        if ext not in LABEL_EXTENSIONS:
            raise bad_request(f"result_extension {ext!r} not supported: one of {', '.join(LABEL_EXTENSIONS)}")
        label_dtype, compress = label_format(req)
        # what would refuse the answer only after the work is checked before it (a volume's heatmap as PNG
        # was refused after 18 s of saliency)
        if ext == ".png" and is_volume(img):
            raise bad_request("a PNG label needs a 2D image; ask for .nii.gz or .nrrd")
        if flag(req, "save_label", False):
            check_id(str(req.get("label_tag") or "final"), "label tag")
        t1 = time.time()
        try:
            arr, result = self.run(img, req)
        except InvalidInputError as e:
            if self.image_only:
                self._unusable(req, path, public_problem(e, path, req))
            raise bad_request(f"{src}: {public_problem(e, path, req)}") from e
        t2 = time.time()
        out = None
        if arr is not None:
            # a heatmap stays float; a label is written in the type the client reads it as
            dtype = np.float32 if arr.dtype.kind == "f" else np.dtype(label_dtype or "uint8")
            out = write_label(arr, img, ext, dtype=dtype, compress=compress)
        result.setdefault("label_names", self.label_names(result))
        # a session's file name can name the patient (the datastore refuses such ids; sessions keep the name)
        result["input"] = {"kind": img.meta.get("kind"), "dims": [int(s) for s in img.shape[1:]],
                           "file": safe_file_name(os.path.basename(Path(str(img.meta.get("filename_or_obj", "")))))}
        if req.get("image_id"):
            result["input"]["file"] = req["image_id"]
        result["latencies"] = {"read": round(t1 - t0, 4), "infer": round(t2 - t1, 4),
                               "write": round(time.time() - t2, 4), "total": round(time.time() - t0, 4)}
        return out, result
