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


def not_a_checkout(missing: Path) -> str:
    """What to say when one of the project's own files is missing because the project root is no checkout (a
    non-editable install takes ``site-packages/..`` as its root): an empty string when the root is one."""
    root = project_root()
    if (root / "configs").is_dir() and (root / "monai_app").is_dir():
        return ""
    return (f" ({root} is not a checkout of the repository: tumorlens runs from one, installed with `make setup` or "
            "`pip install -e .` in it, or with TUMORLENS_HOME set to it)")


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


def config_data_root(root: str | Path) -> Path:
    """A config's ``data.root``: absolute as given; ``../shared/data/<set>`` (the configs' own form) under
    ``TUMORLENS_SHARED_DATA`` when that is set (the commands that read a model's training data had ignored it);
    other relative paths from the project root."""
    p = Path(root)
    if p.is_absolute():
        return p
    parts = p.parts
    if os.environ.get("TUMORLENS_SHARED_DATA") and parts[:3] == ("..", "shared", "data"):
        return shared_data_dir().joinpath(*parts[3:])
    return (project_root() / p).resolve()


@lru_cache(maxsize=1)
def code_commit() -> str | None:
    """The checkout's commit (``abc1234``, ``-dirty`` with uncommitted edits to tracked files), for provenance:
    records written by different code of the same version had been indistinguishable. None outside git."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        if not head:
            return None
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None
