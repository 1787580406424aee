"""Request checks that MONAI Label 0.8.5 leaves to fail deep inside its endpoints with a 500.

Its endpoints parse the ``params`` / ``info`` form fields with ``json.loads`` and use the result as
a dict (not JSON, or JSON that is not an object: 500); ``/infer`` serves ``output=image`` with the
task's label file even when the task answers with JSON only, and builds DICOM-SEG with dcmqi, which
this app does not install; ``/train`` starts a training process before the settings are looked
at; ``/batch/infer/{model}`` and ``/scoring/{method}`` answer 200 for a model or method that does
not exist and fail later in a background process; ``/infer`` without an image is a 500 and an
OHIF scribble (``.bin``) of the wrong size one deeper down; info updates and label reads of images
or labels that do not exist are 500s or empty 200s; an image checksum never matches (MONAI Label
compares ``"SHA256:<hex>"`` with the bare digest). These become 4xx with a message (or a correct
answer) before any work is done. The endpoints stay MONAI Label's: each check wraps the
module-level function that its route calls.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable
from functools import wraps

from lib.errors import bad_request, not_found


def json_object(text: str | None, field: str) -> dict:
    """``text`` parsed as a JSON object, or a 400 naming the form field."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise bad_request(f"{field} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
    except RecursionError as e:  # the decoder recurses once per nesting level
        raise bad_request(f"{field} is nested too deeply to be settings") from e
    if not isinstance(value, dict):
        raise bad_request(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def check_infer_output(model: str, output) -> None:
    out = getattr(output, "value", output)
    if out == "dicom_seg":
        raise bad_request("output=dicom_seg is not offered: tumorlens returns NIfTI, NRRD or PNG labels "
                          "(ask for output=image with params {\"result_extension\": \".nrrd\"})")
    if out == "image":
        from monailabel.interfaces.utils.app import app_instance

        task = app_instance()._infers.get(model)
        if task is not None and not getattr(task, "returns_label", True):
            raise bad_request(f"{model} answers with JSON only: ask for output=json (or all)")


# keys MONAI Label and its clients put in every training request, whatever the trainer's settings
MONAI_LABEL_TRAIN_KEYS = {"model", "name", "device", "multi_gpu", "gpus", "bundle_path", "logging", "client_id",
                          "dataset", "pretrained", "train_batch_size", "val_batch_size", "val_split", "tracking",
                          "tracking_uri", "tracking_experiment_name", "early_stop_patience", "local_rank", "amp"}
ALIASES = {"epochs": "max_epochs", "epoch": "max_epochs", "num_epochs": "max_epochs", "n_epochs": "max_epochs",
           "learning_rate": "lr", "learningrate": "lr", "batch": "batch_size", "batchsize": "batch_size"}


def check_train_request(request: dict, defaults: dict, limits: dict | None = None,
                        choices: dict | None = None) -> None:
    """Training settings must be in range before a training process is started: numbers between a
    floor and ``limits``, names from ``choices``; a misspelt setting (ignored silently, it would train
    with the default) is refused with the right name."""
    import difflib

    limits, choices = limits or {}, choices or {}
    for key in request:
        if key in defaults or key in MONAI_LABEL_TRAIN_KEYS or not isinstance(key, str):
            continue
        close = ALIASES.get(key.lower().replace("-", "_")) or next(
            iter(difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.75)), None)
        if close:
            raise bad_request(f"unknown training setting {key!r}: did you mean {close!r}? "
                              f"settings: {', '.join(defaults)}")
    for key, default in defaults.items():
        if key not in request:
            continue
        if key in choices:
            if request[key] not in choices[key]:
                raise bad_request(f"{key} must be one of {', '.join(map(str, choices[key]))}, got {request[key]!r}")
            continue
        if not isinstance(default, int | float) or isinstance(default, bool):
            continue
        value = request[key]
        if isinstance(value, str):  # form-style clients send "5"; the trainer converts it the same way
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and isinstance(default, int):
            ok = float(value).is_integer() and value >= 1
        elif ok:
            ok = value >= 0 if key.endswith("weight") else value > 0
        if not ok:
            kind = "a whole number >= 1" if isinstance(default, int) else \
                "a number >= 0" if key.endswith("weight") else "a number > 0"
            raise bad_request(f"{key} must be {kind}, got {request[key]!r}")
        if key in limits and value > limits[key]:
            raise bad_request(f"{key} must be at most {limits[key]:g}, got {request[key]!r}")


def _known(what: str, name, available) -> None:
    if name not in available:
        raise not_found(f"unknown {what} {name!r}; available: {', '.join(available)}")


def check_train_endpoint(arguments: dict) -> None:
    """``POST /train/[{model}]``: MONAI Label starts the training process first and fails in it later."""
    from monailabel.interfaces.utils.app import app_instance

    trainers = app_instance()._trainers
    model = arguments.get("model") or next(iter(trainers), None)
    _known("trainer", model, trainers)
    params = arguments.get("params") or {}
    task = trainers[model]
    limits, choices = getattr(task, "LIMITS", None), getattr(task, "CHOICES", None)
    check_train_request(params, task.config(), limits, choices)
    if isinstance(params.get(model), dict):  # POST /train/ takes {model: {settings}} too
        check_train_request(params[model], task.config(), limits, choices)
    ready = getattr(trainers[model], "check_ready", None)
    if ready is not None:
        ready(app_instance().datastore())
    from monailabel.utils.async_tasks.utils import processes

    starting = getattr(trainers[model], "mark_starting", None)
    if starting is not None and not processes("train"):
        settings = dict(params.get(model)) if isinstance(params.get(model), dict) else dict(params)
        starting(settings)


def check_infer_input(arguments: dict) -> None:
    """``/infer`` and the WSI routes: an image id, a file or a live session is needed."""
    from monailabel.interfaces.utils.app import app_instance

    session_id = arguments.get("session_id")
    if not (arguments.get("file") or arguments.get("image") or session_id):
        raise bad_request("no image: give a datastore image id (image=...), a session_id or send a file")
    if session_id:
        sessions = app_instance().sessions()
        if sessions is None or not sessions.get_session(session_id, update_ts=False):
            raise not_found(f"unknown or expired session {session_id!r}: PUT /session/ again")


def _datastore():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance().datastore()


def _image_known(image_id) -> None:
    if not _datastore().get_image_uri(image_id or ""):
        raise not_found(f"unknown image id {image_id!r}")


def _label_known(image_id, tag) -> None:
    _image_known(image_id)
    if tag not in _datastore().get_labels_by_image_id(image_id):
        raise not_found(f"image {image_id!r} has no label with tag {tag!r}")


# answers and file names the datastore derives itself; ``strategy`` is MONAI Label's own record of
# next-sample picks (a string there made every later next-sample a 500)
RESERVED_IMAGE_INFO = ("id", "path", "name", "ext", "strategy", "ts")
RESERVED_LABEL_INFO = ("id", "path", "name", "ext", "ts")


def _refuse_reserved(info: dict, reserved: tuple[str, ...], what: str) -> None:
    keys = [k for k in reserved if k in info]
    if keys:
        raise bad_request(f"{what} info may not set {', '.join(keys)}: the datastore derives them")


MAX_LOG_LINES = 1_000_000


def check_log_lines(arguments: dict) -> None:
    """``GET /logs/?lines=N``: a number past C's size made MONAI Label's tail a 500."""
    lines = arguments.get("lines")
    if isinstance(lines, int) and not 0 <= lines <= MAX_LOG_LINES:
        raise bad_request(f"lines must be from 0 to {MAX_LOG_LINES}, got {lines}")


def check_image_info(arguments: dict) -> None:
    """Classes are checked (and normalised) by the datastore's own ``update_image_info``."""
    _refuse_reserved(json_object(arguments.get("info"), "info"), RESERVED_IMAGE_INFO, "image")
    _image_known(arguments.get("image"))


def check_label_info(arguments: dict) -> None:
    _refuse_reserved(json_object(arguments.get("info"), "info"), RESERVED_LABEL_INFO, "label")
    _label_known(arguments.get("label"), arguments.get("tag"))


def check_checksum(original: Callable) -> Callable:
    """``HEAD /datastore/image?check_sum=[ALGO:]hex``: 200 when the stored image has that digest."""
    from lib.datastore import file_digest

    @wraps(original)
    def call(image: str, check_only=False, check_sum=None):
        if not (check_only and check_sum):
            return original(image, check_only, check_sum)
        algo, _, digest = check_sum.rpartition(":")
        algo = (algo or "SHA256").upper()
        if algo not in ("SHA256", "SHA512", "MD5"):
            raise bad_request(f"check_sum algorithm {algo!r}: use SHA256, SHA512 or MD5")
        uri = _datastore().get_image_uri(image)
        if not uri or not os.path.isfile(uri):
            raise not_found(f"unknown image id {image!r}")
        if file_digest(uri, algo) != digest.strip().lower():
            raise not_found(f"image {image!r} differs from the checksum given")
        return {}

    call.tumorlens_checked = True
    return call


def plain_filename(original: Callable) -> Callable:
    """Downloads name their file as ``filename="..."`` too: for a name with a space or a colon (ids
    like Slicer's "3: T2 FLAIR") Starlette sends only ``filename*=utf-8''...``, which 3D Slicer's
    MONAI Label module does not read (it then skips the label silently)."""
    @wraps(original)
    def call(*args, **kwargs):
        res = original(*args, **kwargs)
        cd = getattr(res, "headers", {}).get("content-disposition", "") if res is not None else ""
        if cd and 'filename="' not in cd and "filename*=" in cd:
            from urllib.parse import unquote

            name = unquote(cd.split("filename*=", 1)[1].split("''", 1)[-1])
            safe = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in name)
            res.headers["content-disposition"] = f'attachment; filename="{safe}"; ' + cd.split("; ", 1)[-1]
        return res

    call.tumorlens_checked = True
    return call


def checked_binary_to_image(original: Callable) -> Callable:
    """An OHIF scribble (raw bytes) must hold one byte per voxel of its image."""
    @wraps(original)
    def call(reference_image, label, *args, **kwargs):
        try:
            return original(reference_image, label, *args, **kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise bad_request(f"label (.bin) does not fit image {os.path.basename(str(reference_image))}: {e}") from e

    call.tumorlens_checked = True
    return call


def check_session_image(arguments: dict) -> None:
    """``GET /session/{id}?image=true`` serves one file; a DICOM series or an archive is a folder."""
    from monailabel.interfaces.utils.app import app_instance

    sessions = app_instance().sessions()
    if not arguments.get("image") or sessions is None:
        return
    info = sessions.get_session(arguments.get("session_id"), update_ts=False)
    if info and os.path.isdir(info.image):
        raise bad_request(f"session {arguments.get('session_id')} holds a folder of "
                          f"{sum(1 for _ in os.scandir(info.image))} files, not one image; "
                          "GET it without image=true for its information")


def mark_stopped(original: Callable) -> Callable:
    """``DELETE /train/``: the run's stats say STOPPED at once, also when it is stopped before its
    process wrote anything (it would otherwise read STARTING until the start grace ran out)."""
    @wraps(original)
    def call(*args, **kwargs):
        res = original(*args, **kwargs)
        from monailabel.interfaces.utils.app import app_instance

        state = getattr(app_instance(), "state", None)
        if res is not None and state is not None:
            stats = state.read_stats()
            if stats.get("status") in ("STARTING", "RUNNING"):
                stats.update(status="STOPPED", note="stopped with DELETE /train/ before it published anything")
                state.write_stats(stats)
        return res

    call.tumorlens_checked = True
    return call


def upload_id_from_name(original: Callable) -> Callable:
    """``PUT /datastore/image`` without ``image=``: MONAI Label takes the id as the file name up to its
    first dot, so every DICOM-UID-named file ("1.2.840.113619....jpg") became image "1" (and clashed);
    the id is the name without its image extension."""
    @wraps(original)
    def call(background_tasks, image=None, params="{}", file=None, user=None):
        if not image and file is not None and getattr(file, "filename", None):
            from lib.datastore import file_ext

            name = os.path.basename(file.filename)
            ext = file_ext(name)
            image = name[: len(name) - len(ext)] if ext and name.lower().endswith(ext) else name
        return original(background_tasks, image, params, file, user)

    call.tumorlens_checked = True
    return call


def _checked(original: Callable, check: Callable[[dict], None]) -> Callable:
    sig = inspect.signature(original)

    @wraps(original)
    def call(*args, **kwargs):
        check(sig.bind(*args, **kwargs).arguments)
        return original(*args, **kwargs)

    call.tumorlens_checked = True
    return call


def check_batch_infer_endpoint(arguments: dict) -> None:
    """``POST /batch/infer/{model}``: the model must be one of the app's infer tasks, and ``images``
    in the params (which overrides the query's) one of MONAI Label's three sets or a list of ids: any
    other word (``"unlabelled"``) ran over every image of the datastore."""
    from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
    from monailabel.interfaces.utils.app import app_instance

    _known("model", arguments.get("model"), sorted(k for k, v in app_instance()._infers.items() if v.is_valid()))
    images = (arguments.get("params") or {}).get("images")
    sets = [t.value for t in BatchInferImageType]
    if images is not None and images not in sets and not (
            isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise bad_request(f"images must be one of {', '.join(sets)} or a list of image ids, got {images!r}"[:300])


def check_scoring_endpoint(arguments: dict) -> None:
    """``POST /scoring/{method}``: the method must be one of the app's scoring methods."""
    from monailabel.interfaces.utils.app import app_instance

    _known("scoring method", arguments.get("method"), list(app_instance()._scoring_methods))


def refuse_model_change(arguments: dict) -> None:
    """``PUT`` / ``DELETE /model/{model}`` would overwrite or move the checkpoint the tasks run; the
    model changes only through training, which publishes a new version and keeps the old ones."""
    from fastapi import HTTPException

    raise HTTPException(status_code=405, detail=f"the model of {arguments.get('model')!r} is not replaced or deleted "
                        "through /model: POST /train/ publishes a new version and keeps every earlier one")


class _CheckedWsiJson:
    """``POST /infer/wsi_v2/{model}`` parses its ``wsi`` form field in the route itself
    (``WSIInput.parse_obj(json.loads(wsi))``), before any module function a check could wrap: a
    malformed field was a 500. This stands in for that module's ``json``: its ``loads`` also checks the
    object against ``WSIInput`` and answers a 400 naming the field."""

    tumorlens_checked = True

    def __getattr__(self, name: str):
        return getattr(json, name)

    @staticmethod
    def loads(text, *args, **kwargs):
        from monailabel.endpoints.wsi_infer import WSIInput
        from pydantic import ValidationError

        value = json_object(text, "wsi")
        try:
            WSIInput.model_validate(value)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "value"
            raise bad_request(f"wsi.{where}: {first.get('msg')}") from e
        return value


class _CheckedSubprocess:
    """``GET /logs/gpu`` runs ``nvidia-smi`` through its module's ``subprocess``; on a machine without
    it the missing program was a 500. This stands in for that module: a 404 with a message."""

    tumorlens_checked = True

    def __getattr__(self, name: str):
        import subprocess

        return getattr(subprocess, name)

    @staticmethod
    def run(cmd, *args, **kwargs):
        import shutil
        import subprocess

        if shutil.which(cmd[0]) is None:
            raise not_found(f"this server has no NVIDIA GPU ({cmd[0]} not found)")
        return subprocess.run(cmd, *args, **kwargs)


def local_datastore_proxy(original: Callable) -> Callable:
    """``/proxy/dicom/...`` forwards to a DICOMweb server; a local-folder datastore has none."""
    from monailabel.config import settings

    @wraps(original)
    async def call(*args, **kwargs):
        if not str(settings.MONAI_LABEL_STUDIES).startswith(("http://", "https://")):
            raise not_found("the datastore is a local folder, not a DICOMweb server: there is nothing to proxy")
        return await original(*args, **kwargs)

    call.tumorlens_checked = True
    return call


def own_log_file(original: Callable) -> Callable:
    """``GET /logs/`` reads this server's log (``TUMORLENS_LOG_FILE``, set by ``tumorlens serve``), not the app
    folder's ``logs/app.log`` that every server started from the checkout had shared."""
    @wraps(original)
    def call(logger_file, *args, **kwargs):
        return original(os.environ.get("TUMORLENS_LOG_FILE") or logger_file, *args, **kwargs)

    call.tumorlens_own_log = True
    return call


def install_request_checks() -> None:
    import monailabel.endpoints.batch_infer as batch_infer
    import monailabel.endpoints.datastore as datastore
    import monailabel.endpoints.infer as infer
    import monailabel.endpoints.logs as logs
    import monailabel.endpoints.model as model
    import monailabel.endpoints.proxy as proxy
    import monailabel.endpoints.scoring as scoring
    import monailabel.endpoints.session as session
    import monailabel.endpoints.train as train
    import monailabel.endpoints.wsi_infer as wsi_infer

    def form(field: str, then: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
        def check(a: dict) -> None:
            json_object(a.get(field), field)
            if then is not None:
                then(a)
        return check

    def infer_check(a: dict) -> None:
        json_object(a.get("params"), "params")
        check_infer_input(a)
        check_infer_output(a.get("model"), a.get("output"))

    if not getattr(logs.get_logs, "tumorlens_own_log", False):
        logs.get_logs = own_log_file(logs.get_logs)
    checks = [(infer, "run_inference", infer_check), (wsi_infer, "run_wsi_inference", check_infer_input),
              (datastore, "add_image", form("params")), (datastore, "save_label", form("params")),
              (datastore, "update_image_info", check_image_info), (datastore, "update_label_info", check_label_info),
              (datastore, "get_label_info", lambda a: _label_known(a.get("label"), a.get("tag"))),
              (datastore, "remove_label", lambda a: _label_known(a.get("id"), a.get("tag"))),
              (session, "get_session", check_session_image),
              (train, "run", check_train_endpoint), (train, "run_model", check_train_endpoint),
              (batch_infer, "run", check_batch_infer_endpoint), (scoring, "run_method", check_scoring_endpoint),
              (model, "update_model", refuse_model_change), (model, "delete_model", refuse_model_change),
              (logs, "get_logs", check_log_lines)]
    for module, name, check in checks:
        fn = getattr(module, name)
        if not getattr(fn, "tumorlens_checked", False):  # an app re-init
            setattr(module, name, _checked(fn, check))
    for module, name, wrapper in [(datastore, "download_image", lambda fn: check_checksum(plain_filename(fn))),
                                  (datastore, "download_label", plain_filename),
                                  (infer, "binary_to_image", checked_binary_to_image),
                                  (train, "stop", mark_stopped),
                                  (proxy, "proxy_dicom", local_datastore_proxy)]:
        fn = getattr(module, name)
        if not getattr(fn, "tumorlens_checked", False):
            setattr(module, name, wrapper(fn))
    if not getattr(datastore.add_image, "tumorlens_id_from_name", False):
        datastore.add_image = upload_id_from_name(datastore.add_image)
        datastore.add_image.tumorlens_id_from_name = True
    if not getattr(logs.subprocess, "tumorlens_checked", False):
        logs.subprocess = _CheckedSubprocess()
    if not getattr(wsi_infer.json, "tumorlens_checked", False):
        wsi_infer.json = _CheckedWsiJson()
