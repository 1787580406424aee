"""Strict JSON for metric files and model cards: an undefined metric is ``null``, never ``NaN``.

Python's ``json`` writes ``NaN``/``Infinity`` by default, which is not JSON: ``jq``, browsers and most
other languages refuse the whole file. Metrics are undefined often enough (tumour-only accuracy of a
folder without tumour images, seg Dice of a folder without masks) that every writer goes through here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def json_ready(obj: Any) -> Any:
    """``obj`` with NaN/inf replaced by None and numpy scalars/arrays turned into Python values."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (``allow_nan=False``: a non-finite number that slipped through is an
    error here, not an unreadable file later)."""
    return json.dumps(json_ready(obj), indent=indent, allow_nan=False)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(obj))
    return path
