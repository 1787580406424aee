"""Request checks that MONAI Label 0.8.5 leaves to fail deep inside its endpoints with a 500.

Its endpoints parse the ``params`` / ``info`` form fields with ``json.loads`` and use the result as
a dict (not JSON, or JSON that is not an object: 500); ``/infer`` serves ``output=image`` with the
task's label file even when the task answers with JSON only, and builds DICOM-SEG with dcmqi, which
this app does not install; ``/train`` starts a training process before the settings are looked
at; ``/batch/infer/{model}`` and ``/scoring/{method}`` answer 200 for a model or method that does
not exist and fail later in a background process. These become 4xx with a message before any work
is done. The endpoints stay MONAI Label's:
each check wraps the module-level function that its route calls.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from functools import wraps

from lib.errors import bad_request


def json_object(text: str | None, field: str) -> dict:
    """``text`` parsed as a JSON object, or a 400 naming the form field."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise bad_request(f"{field} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
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


def check_train_request(request: dict, defaults: dict) -> None:
    """Numeric training settings must be numbers in range before a training process is started."""
    for key, default in defaults.items():
        if key not in request or not isinstance(default, int | float) or isinstance(default, bool):
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


def _known(what: str, name, available) -> None:
    from lib.errors import not_found

    if name not in available:
        raise not_found(f"unknown {what} {name!r}; available: {', '.join(available)}")


def check_train_endpoint(arguments: dict) -> None:
    """``POST /train/[{model}]``: MONAI Label starts the training process first and fails in it later."""
    from monailabel.interfaces.utils.app import app_instance

    trainers = app_instance()._trainers
    model = arguments.get("model") or next(iter(trainers), None)
    _known("trainer", model, trainers)
    check_train_request(arguments.get("params") or {}, trainers[model].config())


def _checked(original: Callable, check: Callable[[dict], None]) -> Callable:
    sig = inspect.signature(original)

    @wraps(original)
    def call(*args, **kwargs):
        check(sig.bind(*args, **kwargs).arguments)
        return original(*args, **kwargs)

    call.tumorlens_checked = True
    return call


def check_batch_infer_endpoint(arguments: dict) -> None:
    """``POST /batch/infer/{model}``: the model must be one of the app's infer tasks."""
    from monailabel.interfaces.utils.app import app_instance

    _known("model", arguments.get("model"), sorted(k for k, v in app_instance()._infers.items() if v.is_valid()))


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


def install_request_checks() -> None:
    import monailabel.endpoints.batch_infer as batch_infer
    import monailabel.endpoints.datastore as datastore
    import monailabel.endpoints.infer as infer
    import monailabel.endpoints.model as model
    import monailabel.endpoints.scoring as scoring
    import monailabel.endpoints.train as train

    def form(field: str, then: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
        def check(a: dict) -> None:
            json_object(a.get(field), field)
            if then is not None:
                then(a)
        return check

    checks = [(infer, "run_inference", form("params", lambda a: check_infer_output(a.get("model"), a.get("output")))),
              (datastore, "add_image", form("params")), (datastore, "save_label", form("params")),
              (datastore, "update_image_info", form("info")), (datastore, "update_label_info", form("info")),
              (train, "run", check_train_endpoint), (train, "run_model", check_train_endpoint),
              (batch_infer, "run", check_batch_infer_endpoint), (scoring, "run_method", check_scoring_endpoint),
              (model, "update_model", refuse_model_change), (model, "delete_model", refuse_model_change)]
    for module, name, check in checks:
        fn = getattr(module, name)
        if not getattr(fn, "tumorlens_checked", False):  # an app re-init
            setattr(module, name, _checked(fn, check))
