"""Versioned fine-tuned models of one datastore, with an atomic "current" pointer.

Training writes a complete new folder (checkpoint + card) under a hidden temporary name, renames
it into place, and only then replaces ``current.json``; inference resolves the pointer on every
call. A reader therefore sees either the old model or the new one, never half of one, and a crash
mid-training leaves the previous version current (leftover temporary folders are swept on start).
"""

from __future__ import annotations

import json
import logging
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

logger = logging.getLogger(__name__)
POINTER = "current.json"
INCOMING = ".incoming-"


class ModelVersions:
    """``root/vNNNN/{checkpoint.pt,model_card.json}`` plus ``root/current.json``; the base model
    (a registry name or path) is version 0 and is never modified."""

    def __init__(self, root: str | Path, base: str | Path | None = None):
        self.root = Path(root)
        self.base = base
        self.served: str | None = None  # the version folder ``load`` returned (None: the base model)
        self.broken: str | None = None  # why the current version could not be loaded, when it could not
        self.root.mkdir(parents=True, exist_ok=True)

    def sweep(self) -> int:
        """Remove folders a killed training run left half-written; returns how many."""
        n = 0
        for p in self.root.glob(f"{INCOMING}*"):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        for p in list(self.root.glob(f".{POINTER}.*.tmp")) + list(self.root.glob(f".tmp-*-{POINTER}")):
            p.unlink(missing_ok=True)  # a pointer half-written by a killed run (atomic_write's temporary name)
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
        """The current version; when its checkpoint cannot be loaded (a damaged file), the newest earlier
        version that can, else the base model, and ``served`` says which (a damaged v0007 had made every
        inference a bare 500 while ``/info/`` still named it)."""
        current = self.current_path()
        try:
            model = load_model(current, device=device)
            self.served, self.broken = (current.name if current.parent == self.root else None), None
            return model
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back, and say so
            if current.parent != self.root:
                raise
            problem = f"{current.name}: its checkpoint cannot be loaded ({type(e).__name__})"
            logger.debug(f"{current}: {e}")
            if problem != self.broken:
                logger.error(f"model version {problem}; serving the newest earlier version that loads")
        for name in reversed([v for v in self.versions() if v < current.name]):
            try:
                model = load_model(self.root / name, device=device)
            except Exception:  # noqa: BLE001
                continue
            self.served, self.broken = name, problem
            return model
        self.served, self.broken = None, problem
        return load_model(resolve(self.base), device=device)

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
