"""YAML configs: one loader, with ``defaults.yaml`` naming the default model of every command."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from tumorlens.errors import InvalidInputError
from tumorlens.paths import configs_dir


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        from tumorlens.paths import not_a_checkout

        raise InvalidInputError(path, f"config file does not exist{not_a_checkout(path)}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise InvalidInputError(path, f"not UTF-8 text (byte {e.start}): save the file as UTF-8") from e
    except yaml.YAMLError as e:
        raise InvalidInputError(path, f"invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InvalidInputError(path, "config must be a YAML mapping")
    return data


_DEFAULTS_CACHE: dict[Path, tuple[int, dict]] = {}


def defaults() -> dict:
    """``configs/defaults.yaml``, re-read only when the file changes (the server asks on every request)."""
    path = configs_dir() / "defaults.yaml"
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return load_yaml(path)  # raises the typed error naming the file
    hit = _DEFAULTS_CACHE.get(path)
    if hit is None or hit[0] != stamp:
        hit = (stamp, load_yaml(path))
        _DEFAULTS_CACHE[path] = hit
    return copy.deepcopy(hit[1])


def default_model_name() -> str:
    return str(defaults()["model"])


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
