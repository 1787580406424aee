"""What the small networks trained beside a dual-head model share (the lesion refiner, the lesion-window
classifier): the model's own grouped split, jittered windows around the true lesions, a one-cycle training
loop, and storing the result beside the model only when it won on that model's validation part.

One place for these, so the two companions are trained, judged and recorded the same way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tumorlens.atomic import atomic_write_text
from tumorlens.data.manifest import Manifest, load_manifest
from tumorlens.data.readers import is_volume, read_image
from tumorlens.data.splits import training_split
from tumorlens.errors import InvalidInputError, TrainingDivergedError
from tumorlens.evaluation.jsonio import write_json
from tumorlens.labels import NO_TUMOUR
from tumorlens.models.refiner import CROP, crop_grid, lesion_box, lesion_window, normalise_crop, sample

log = logging.getLogger(__name__)

# at inference a window sits on the product's lesion, near but not on the truth: training windows are jittered
JITTER = {"shift": 0.15, "log_scale": 0.3, "angle": 0.3, "log_gamma": 0.3}


@dataclass
class CompanionData:
    """The model's grouped split of a manifest folder, and whether it is the manifest the model was trained on."""

    root: Path
    manifest: Manifest
    same_data: bool
    train_idx: list[int]
    val_idx: list[int]


def companion_data(predictor, data_dir: str | Path | None, max_images: int | None, measured: str) -> CompanionData:
    """The grouped split the model in ``predictor`` was trained with, applied to ``data_dir`` (default: the
    development data); ``measured`` names the figure that is only the model's own when the data is."""
    from tumorlens.paths import shared_data_dir

    card = predictor.model.card
    split = card.get("data", {}).get("split", {})
    root = Path(data_dir) if data_dir else shared_data_dir() / "brain-mri-2d"
    manifest = load_manifest(root)
    same_data = card.get("data", {}).get("manifest_sha256") == manifest.sha256
    if not same_data:
        log.warning("%s is not the manifest model %s was trained on: its grouped split is used, and the %s is not "
                    "measured on the model's own validation part", root, predictor.model.name, measured)
    train_idx, val_idx = training_split(manifest, float(split.get("val_fraction", 0.2)), int(split.get("seed", 0)),
                                        max_images)
    return CompanionData(root, manifest, same_data, train_idx, val_idx)


def lesion_slices(manifest, idx: list[int], progress: bool = True) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(slice, true mask, label) of the 2D tumour images with a non-empty outline among ``idx``."""
    from tumorlens.evaluation.evaluate import truth_mask

    out = []
    for i in tqdm(idx, desc="reading outlines", disable=not progress):
        r = manifest.records[i]
        if r.label == NO_TUMOUR or r.mask is None:
            continue
        img = read_image(r.image)
        if is_volume(img):
            continue
        truth = truth_mask(r.mask, img)
        if truth.any():
            out.append((img[0].numpy().astype(np.float32), truth, r.label))
    return out


def training_outlines(data: CompanionData, progress: bool = True) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """``lesion_slices`` of the training part; a typed error when there is none to learn from."""
    items = lesion_slices(data.manifest, data.train_idx, progress)
    if not items:
        raise InvalidInputError(data.root, "no 2D tumour image with an outline in the training part: nothing to learn from")
    return items


def augmented_batch(items: list[tuple[np.ndarray, np.ndarray, str]], rng: np.random.Generator,
                    crop: int = CROP, scales: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Jittered windows around the true lesions [B, len(scales), crop, crop] (one channel per window size, as a
    multiple of the lesion window, sharing the jitter) and the true mask in the first window [B, 1, crop, crop]."""
    x = np.zeros((len(items), len(scales), crop, crop), np.float32)
    y = np.zeros((len(items), 1, crop, crop), np.float32)
    for j, (arr, truth, _) in enumerate(items):
        cy, cx, side = lesion_box(truth)
        cy += rng.normal() * JITTER["shift"] * side
        cx += rng.normal() * JITTER["shift"] * side
        side *= np.exp(rng.uniform(-JITTER["log_scale"], JITTER["log_scale"]))
        angle, flip = rng.uniform(-JITTER["angle"], JITTER["angle"]), rng.random() < 0.5
        gamma = np.exp(rng.uniform(-JITTER["log_gamma"], JITTER["log_gamma"]))
        for k, s in enumerate(scales):
            g = crop_grid(arr.shape, cy, cx, s * lesion_window(side), crop, angle, flip)
            c = sample(arr, g)
            x[j, k] = normalise_crop(np.clip(c / max(float(c.max()), 1e-6), 0, None) ** gamma)
            if k == 0:
                y[j, 0] = sample(truth.astype(np.float32), g) > 0.5
    return torch.from_numpy(x), torch.from_numpy(y)


def one_cycle_fit(net: torch.nn.Module, items: list, epochs: int, settings: dict,
                  batch_loss: Callable[[torch.nn.Module, list, np.random.Generator], torch.Tensor],
                  rng: np.random.Generator, desc: str, pct_start: float, progress: bool = True,
                  after_epoch: Callable[[torch.nn.Module], dict] | None = None) -> tuple[list[dict], float]:
    """AdamW under a one-cycle schedule to ``settings["lr"]`` over ``epochs`` passes of ``items`` in batches of
    ``settings["batch_size"]``; the last epoch's weights are kept (the schedule ends annealed). ``after_epoch``
    adds figures to each epoch's history entry. Returns (history, seconds)."""
    opt = torch.optim.AdamW(net.parameters(), settings["lr"], weight_decay=settings["weight_decay"])
    bs = min(settings["batch_size"], len(items))
    steps = max(1, len(items) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=epochs * steps, pct_start=pct_start)
    t0 = time.time()
    history = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress)
    for epoch in bar:
        net.train()
        order = rng.permutation(len(items))
        total = 0.0
        for k in range(steps):
            loss = batch_loss(net, [items[i] for i in order[k * bs:(k + 1) * bs]], rng)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        rec = {"epoch": epoch + 1, "loss": round(total / steps, 4)}
        if after_epoch is not None:
            net.eval()
            rec |= after_epoch(net)
        history.append(rec)
        bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k != "epoch" and isinstance(v, float)})
    return history, time.time() - t0


def fit_summary(settings: dict, epochs: int, device: str, seconds: float, history: list[dict], **extra) -> dict:
    """The ``training`` entry of a companion's record."""
    return {**settings, **extra, "epochs": epochs, "device": device, "threads": torch.get_num_threads(),
            "duration_s": round(seconds, 1), "seconds_per_epoch": round(seconds / max(epochs, 1), 1), "history": history}


def conclude(companion, predictor, filename: str, card_key: str, data: CompanionData, n_outlines: int,
             training: dict, validation: dict, wins: bool, save: bool, json_out: str | Path | None,
             not_stored: str, **fields) -> dict:
    """The companion's record (``fields`` first, then when, on what, how it trained and what validation
    said). ``companion`` (``.net``, ``.crop``, ``.meta``, ``.save``) is stored beside the model, and the record
    in the model card under ``card_key``, when it ``wins`` and ``save`` is asked; ``json_out`` gets the record."""
    record = {"file": filename, "crop": companion.crop, **fields,
              "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "data": {"root": str(data.root), "same_manifest_as_model": data.same_data, "n_train_outlines": n_outlines},
              "training": training, "validation": validation, "stored": bool(save and wins)}
    if save and wins:
        companion.net.to("cpu")
        companion.meta = {k: record[k] for k in ("trained_at", "validation", "data")} | {
            "model_version": predictor.model.version}
        companion.save(Path(predictor.model.path) / filename)
        record_in_card(Path(predictor.model.path), card_key, record)
    elif save:
        log.warning("%s: not stored", not_stored)
    if json_out:
        write_json(record, json_out)
    return record


def record_in_card(folder: Path, key: str, record: dict) -> None:
    """Write a companion network's training record into the model card under ``key``."""
    from tumorlens.models.registry import CARD

    path = folder / CARD
    card = json.loads(path.read_text()) if path.is_file() else {}
    card[key] = {k: v for k, v in record.items() if k != "stored"}
    atomic_write_text(path, json.dumps(card, indent=2, default=str))
