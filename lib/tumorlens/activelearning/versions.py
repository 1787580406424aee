"""Versioned fine-tuned models of one datastore, with an atomic "current" pointer.

Training writes a complete new folder (checkpoint + card) under a hidden temporary name, renames
it into place, and only then replaces ``current.json``; inference resolves the pointer on every
call. A reader therefore sees either the old model or the new one, never half of one, and a crash
mid-training leaves the previous version current (leftover temporary folders are swept on start).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from tumorlens.atomic import atomic_write_text
from tumorlens.errors import TrainingDivergedError
from tumorlens.models.registry import CARD, CHECKPOINT, LoadedModel, load_model, resolve, save_checkpoint

POINTER = "current.json"
INCOMING = ".incoming-"


class ModelVersions:
    """``root/vNNNN/{checkpoint.pt,model_card.json}`` plus ``root/current.json``; the base model
    (a registry name or path) is version 0 and is never modified."""

    def __init__(self, root: str | Path, base: str | Path | None = None):
        self.root = Path(root)
        self.base = base
        self.root.mkdir(parents=True, exist_ok=True)

    def sweep(self) -> int:
        """Remove folders a killed training run left half-written; returns how many."""
        n = 0
        for p in self.root.glob(f"{INCOMING}*"):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        for p in self.root.glob(f".{POINTER}.*.tmp"):
            p.unlink(missing_ok=True)
        return n

    def pointer(self) -> dict:
        f = self.root / POINTER
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def current_path(self) -> Path:
        p = self.pointer().get("folder")
        if p:
            folder = self.root / p
            if (folder / CHECKPOINT).is_file() and (folder / CARD).is_file():
                return folder
        return resolve(self.base)

    def load(self, device: str = "cpu") -> LoadedModel:
        return load_model(self.current_path(), device=device)

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("v[0-9][0-9][0-9][0-9]") if (p / CARD).is_file())

    def next_name(self) -> str:
        done = self.versions()
        n = int(done[-1][1:]) + 1 if done else 1
        return f"v{n:04d}"

    def publish(self, net: torch.nn.Module, cfg: dict, card: dict,
                extra: Callable[[Path, str], None] | None = None) -> Path:
        """Write a new version completely (``extra(folder, version)`` adds files beside the checkpoint,
        e.g. the carried text heads), then make it current. Weights that are not finite are refused."""
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingDivergedError(f"refusing to publish a model whose weights are not finite ({bad[0]}, "
                                        f"{len(bad)} tensors)")
        name = self.next_name()
        card = dict(card, version=name, published_at=datetime.now(UTC).isoformat(timespec="seconds"))
        tmp = Path(tempfile.mkdtemp(prefix=INCOMING, dir=self.root))
        tmp.chmod(0o755)
        save_checkpoint(net, cfg, card, tmp)
        if extra is not None:
            extra(tmp, name)
        final = self.root / name
        os.replace(tmp, final)
        atomic_write_text(self.root / POINTER, json.dumps({"folder": name, "version": name,
                                                           "published_at": card["published_at"]}, indent=2))
        return final
