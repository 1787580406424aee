"""``tumorlens train-refiner``: fit the lesion refiner (``tumorlens.models.refiner``) of a trained model.

The refiner learns from the tumour outlines of the model's own grouped training part, on crops
centred on the true lesion and jittered in place, size, angle, side and gamma, because at
inference it is centred on the seg head's lesion, which is near but not on the truth. It is judged
on the model's grouped validation part exactly as ``tumorlens evaluate`` scores seg Dice (seg head
mask, then the refined one) and written next to the model only when it raised that Dice.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tumorlens.evaluation.metrics import dice_score
from tumorlens.labels import NO_TUMOUR
from tumorlens.models.refiner import REFINER_FILE, LesionRefiner, build_refiner_net
from tumorlens.training.companion import (
    JITTER,
    augmented_batch,
    companion_data,
    conclude,
    fit_summary,
    lesion_slices,
    one_cycle_fit,
    training_outlines,
)

DEFAULTS = {"epochs": 24, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "seed": 0}


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
        probs, seg, *_ = predictor.forward_batch(prepare_slice(arr, predictor.size))
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

    predictor = Predictor(model, refine=False)
    data = companion_data(predictor, data_dir, max_images, "validation Dice")
    train_items = training_outlines(data, progress)
    val_items = lesion_slices(data.manifest, data.val_idx, progress)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(DEFAULTS["seed"])
    rng = np.random.default_rng(DEFAULTS["seed"])
    net = build_refiner_net().to(device)

    def batch_loss(net, batch, rng):
        x, y = augmented_batch(batch, rng)
        return refiner_loss(net(x.to(device)), y.to(device))

    history, seconds = one_cycle_fit(net, train_items, epochs, DEFAULTS, batch_loss, rng, "training refiner", 0.15,
                                     progress)
    refiner = LesionRefiner(net=net.eval(), device=device)
    val = validation_dice(predictor, refiner, val_items, progress)
    wins = val["n"] > 0 and val["seg_dice_refined"] > val["seg_dice_head"]
    return conclude(refiner, predictor, REFINER_FILE, "refiner", data, len(train_items),
                    fit_summary(DEFAULTS, epochs, device, seconds, history, jitter=JITTER), val, wins, save, json_out,
                    f"the refiner did not raise seg Dice on validation ({val['seg_dice_head'] or 0:.4f} -> "
                    f"{val['seg_dice_refined'] or 0:.4f})")
