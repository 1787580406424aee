"""Where the project's own files live (configs, shipped models, bundled sample studies)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def project_root() -> Path:
    """The repository root (editable install) or ``TUMORLENS_HOME`` when set."""
    return _resolved_root(os.environ.get("TUMORLENS_HOME") or None)


@lru_cache(maxsize=8)
def _resolved_root(env: str | None) -> Path:  # resolving walks the file system: once per setting
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def configs_dir() -> Path:
    return project_root() / "configs"


def models_dir() -> Path:
    env = os.environ.get("TUMORLENS_MODELS_DIR")
    return Path(env).resolve() if env else project_root() / "models"


def sample_studies_dir() -> Path:
    return project_root() / "samples" / "studies"


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (development and tests only; never bundled)."""
    env = os.environ.get("TUMORLENS_SHARED_DATA")
    return Path(env).resolve() if env else project_root().parent / "shared" / "data"
