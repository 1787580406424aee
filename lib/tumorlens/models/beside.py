"""Small networks stored beside a dual-head checkpoint (``refiner.pt``, ``window_classifier.pt``): written in
fp16 with their settings, read back in float32, and loaded once per file (the server asks on every request)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from tumorlens.atomic import atomic_write
from tumorlens.errors import ModelNotFoundError

T = TypeVar("T")
_cache: dict[tuple[str, float, str, str], Any] = {}
_lock = threading.Lock()


def save_fp16(path: str | Path, net: torch.nn.Module, **fields) -> Path:
    """``net``'s weights in fp16 and ``fields`` (plain values) in one file, written atomically."""
    state = {k: v.half().cpu() if v.is_floating_point() else v.cpu() for k, v in net.state_dict().items()}
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state, **fields}, tmp))


def load_fp16(path: str | Path, build: Callable[[dict], torch.nn.Module], what: str) -> tuple[torch.nn.Module, dict]:
    """(network built by ``build(fields)`` with the stored weights in float32, stored fields); a
    ``ModelNotFoundError`` naming the file and ``what`` it should hold when it cannot be read."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
        net = build(st)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in st["state_dict"].items()})
    except Exception as e:
        raise ModelNotFoundError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e
    return net.eval(), st


def load_beside(model_path: str | Path, filename: str, loader: Callable[[Path, str], T], device: str = "cpu") -> T | None:
    """``loader(path, device)`` of the file stored beside a model, cached per file, modification time and
    device; None when the model has none."""
    path = Path(model_path) / filename
    if not path.is_file():
        return None
    key = (str(path.resolve()), path.stat().st_mtime, str(device), filename)
    with _lock:
        if key not in _cache:
            _cache[key] = loader(path, device)
        return _cache[key]
