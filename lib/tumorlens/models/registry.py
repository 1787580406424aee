"""Model registry: ``models/<name>/checkpoint.pt`` + ``model_card.json``; the default comes from
``configs/defaults.yaml``. A path to a checkpoint file or folder works wherever a name does.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tumorlens.errors import ModelNotFoundError
from tumorlens.labels import CLASS_NAMES
from tumorlens.models.dualhead import DualHeadNet, build_model
from tumorlens.paths import models_dir

CHECKPOINT = "checkpoint.pt"
CARD = "model_card.json"
_cache: dict[tuple[str, float], LoadedModel] = {}
_lock = threading.Lock()


@dataclass
class LoadedModel:
    net: DualHeadNet
    name: str
    version: str
    path: Path
    config: dict
    card: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.config.get("data", {}).get("image_size", 128))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.card.get("labels", CLASS_NAMES))

    @property
    def backbone(self) -> str:
        return self.net.backbone


def version_label(version) -> str:
    """A model version as printed: "v202611302353", and an app version "v0003" as it is (not "vv0003")."""
    v = str(version)
    return v if v.startswith("v") else f"v{v}"


def list_models(root: Path | None = None) -> list[str]:
    root = root or models_dir()
    return sorted(p.parent.name for p in root.glob(f"*/{CARD}"))


def resolve(name_or_path: str | Path | None) -> Path:
    """Folder of the model: a registered name, a folder, or a checkpoint file."""
    if name_or_path is None:
        from tumorlens.config import default_model_name

        name_or_path = default_model_name()
    p = Path(name_or_path)
    if p.is_file():
        return p.parent
    if p.is_dir() and (p / CHECKPOINT).is_file():
        return p
    cand = models_dir() / str(name_or_path)
    if (cand / CHECKPOINT).is_file():
        return cand
    known = ", ".join(list_models()) or "none"
    raise ModelNotFoundError(f"no model {str(name_or_path)!r} (registered: {known})")


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load (and cache per file and mtime) a dual-head model in eval mode, float32."""
    folder = resolve(name_or_path)
    ckpt_path = folder / CHECKPOINT
    key = (str(ckpt_path.resolve()), ckpt_path.stat().st_mtime, str(device))
    with _lock:
        if key in _cache:
            return _cache[key]
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelNotFoundError(f"{ckpt_path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
        cfg = ckpt["config"]
        net = build_model(cfg)
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        net.load_state_dict(state)
        net.eval().to(device)
        card = json.loads((folder / CARD).read_text()) if (folder / CARD).is_file() else {}
        lm = LoadedModel(net=net, name=card.get("name", folder.name), version=str(card.get("version", "0")),
                         path=folder, config=cfg, card=card)
        _cache[key] = lm
        return lm


def save_checkpoint(net: torch.nn.Module, cfg: dict, card: dict, folder: str | Path, half: bool = True) -> Path:
    """Write checkpoint + card atomically (temp file then rename), so a reader never sees half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in net.state_dict().items()}
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save({"state_dict": state, "config": cfg}, tmp)
    tmp.replace(folder / CHECKPOINT)
    tmpc = folder / (CARD + ".tmp")
    tmpc.write_text(json.dumps(card, indent=2, default=str))
    tmpc.replace(folder / CARD)
    return folder
