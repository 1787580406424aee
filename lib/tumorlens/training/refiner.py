"""``tumorlens train-refiner``: fit the lesion refiner (``tumorlens.models.refiner``) of a trained model.

The refiner learns from the tumour outlines of the model's own grouped training part, on crops
centred on the true lesion and jittered in place, size, angle, side and gamma, because at
inference it is centred on the seg head's lesion, which is near but not on the truth. It is judged
on the model's grouped validation part exactly as ``tumorlens evaluate`` scores seg Dice (seg head
mask, then the refined one) and written next to the model only when it raised that Dice.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tumorlens.atomic import atomic_write_text
from tumorlens.data.manifest import load_manifest
from tumorlens.data.readers import is_volume, read_image
from tumorlens.data.splits import training_split
from tumorlens.errors import InvalidInputError, TrainingDivergedError
from tumorlens.evaluation.jsonio import write_json
from tumorlens.evaluation.metrics import dice_score
from tumorlens.labels import NO_TUMOUR
from tumorlens.models.refiner import (
    CROP,
    REFINER_FILE,
    LesionRefiner,
    build_refiner_net,
    crop_grid,
    lesion_box,
    lesion_window,
    normalise_crop,
    sample,
)

log = logging.getLogger(__name__)

DEFAULTS = {"epochs": 24, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "seed": 0}
JITTER = {"shift": 0.15, "log_scale": 0.3, "angle": 0.3, "log_gamma": 0.3}


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


def refiner_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    inter = (p * target).sum((1, 2, 3))
    den = p.sum((1, 2, 3)) + target.sum((1, 2, 3))
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - (2 * inter + 1) / (den + 1)).mean()


def validation_dice(predictor, refiner: LesionRefiner, items: list[tuple[np.ndarray, np.ndarray, str]],
                    progress: bool = True) -> dict:
    """seg Dice of the seg head alone and with the refiner, through ``Predictor.lesion_probability`` as
    ``tumorlens evaluate`` computes it (``predictor`` is one without a refiner)."""
    from tumorlens.inference import Predictor, prepare_slice, tumour_mask

    with_refiner = Predictor(predictor.model, aligned=False, refine=False)
    with_refiner.refiner = refiner
    coarse, refined, t_head, t_refine = [], [], 0.0, 0.0
    for arr, truth, _ in tqdm(items, desc="validating", disable=not progress):
        t = time.perf_counter()
        probs, seg, _ = predictor.forward_batch(prepare_slice(arr, predictor.size))
        called = predictor.model.labels[int(probs[0].argmax())] != NO_TUMOUR
        coarse.append(dice_score(tumour_mask(predictor.lesion_probability(seg, arr, called), called), truth))
        t_head += time.perf_counter() - t
        t = time.perf_counter()
        better = with_refiner.lesion_probability(seg, arr, called)
        t_refine += time.perf_counter() - t
        refined.append(dice_score(tumour_mask(better, called), truth))
    n = len(items)
    return {"n": n, "seg_dice_head": float(np.mean(coarse)) if n else None,
            "seg_dice_refined": float(np.mean(refined)) if n else None,
            "seconds_per_image_head": round(t_head / n, 4) if n else None,
            "seconds_per_image_refiner": round(t_refine / n, 4) if n else None}


def train_refiner(model: str | None = None, data_dir: str | Path | None = None, epochs: int = DEFAULTS["epochs"],
                  max_images: int | None = None, save: bool = True, json_out: str | Path | None = None,
                  progress: bool = True, device: str | None = None) -> dict:
    """Train, validate and (when it wins) store the refiner of ``model``; returns the record written
    into the model card's ``refiner`` entry."""
    from tumorlens.inference import Predictor
    from tumorlens.paths import shared_data_dir

    predictor = Predictor(model, refine=False)
    card = predictor.model.card
    split = card.get("data", {}).get("split", {})
    root = Path(data_dir) if data_dir else shared_data_dir() / "brain-mri-2d"
    manifest = load_manifest(root)
    same_data = card.get("data", {}).get("manifest_sha256") == manifest.sha256
    if not same_data:
        log.warning("%s is not the manifest model %s was trained on: its grouped split is used, and the validation "
                    "Dice is not measured on the model's own validation part", root, predictor.model.name)
    train_idx, val_idx = training_split(manifest, float(split.get("val_fraction", 0.2)), int(split.get("seed", 0)),
                                        max_images)
    train_items = lesion_slices(manifest, train_idx, progress)
    val_items = lesion_slices(manifest, val_idx, progress)
    if not train_items:
        raise InvalidInputError(root, "no 2D tumour image with an outline in the training part: nothing to learn from")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(DEFAULTS["seed"])
    rng = np.random.default_rng(DEFAULTS["seed"])
    net = build_refiner_net().to(device)
    opt = torch.optim.AdamW(net.parameters(), DEFAULTS["lr"] / 3, weight_decay=DEFAULTS["weight_decay"])
    bs = min(DEFAULTS["batch_size"], len(train_items))
    steps = max(1, len(train_items) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, DEFAULTS["lr"], total_steps=epochs * steps, pct_start=0.15)
    t0 = time.time()
    history = []
    bar = tqdm(range(epochs), desc="training refiner", disable=not progress)
    for epoch in bar:
        net.train()
        order = rng.permutation(len(train_items))
        total = 0.0
        for k in range(steps):
            x, y = augmented_batch([train_items[i] for i in order[k * bs:(k + 1) * bs]], rng)
            loss = refiner_loss(net(x.to(device)), y.to(device))
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"refiner loss became {loss.item()} in epoch {epoch + 1}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        history.append({"epoch": epoch + 1, "loss": round(total / steps, 4)})
        bar.set_postfix(loss=f"{total / steps:.3f}")
    seconds = time.time() - t0
    refiner = LesionRefiner(net=net.eval(), device=device)
    val = validation_dice(predictor, refiner, val_items, progress)
    wins = val["n"] > 0 and val["seg_dice_refined"] > val["seg_dice_head"]
    record = {"file": REFINER_FILE, "crop": CROP, "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "data": {"root": str(root), "same_manifest_as_model": same_data, "n_train_outlines": len(train_items)},
              "training": {**DEFAULTS, "epochs": epochs, "jitter": JITTER, "device": device,
                           "threads": torch.get_num_threads(), "duration_s": round(seconds, 1),
                           "seconds_per_epoch": round(seconds / max(epochs, 1), 1), "history": history},
              "validation": val, "stored": bool(save and wins)}
    if save and wins:
        refiner.net.to("cpu")
        refiner.meta = {k: record[k] for k in ("trained_at", "validation", "data")} | {
            "model_version": predictor.model.version}
        refiner.save(Path(predictor.model.path) / REFINER_FILE)
        record_in_card(Path(predictor.model.path), "refiner", record)
    elif save:
        log.warning("the refiner did not raise seg Dice on validation (%.4f -> %.4f): not stored",
                    val["seg_dice_head"] or 0, val["seg_dice_refined"] or 0)
    if json_out:
        write_json(record, json_out)
    return record


def record_in_card(folder: Path, key: str, record: dict) -> None:
    """Write a companion network's training record into the model card under ``key``."""
    import json

    from tumorlens.models.registry import CARD

    path = folder / CARD
    card = json.loads(path.read_text()) if path.is_file() else {}
    card[key] = {k: v for k, v in record.items() if k != "stored"}
    atomic_write_text(path, json.dumps(card, indent=2, default=str))
