"""How good are the saliency maps? Localisation against tumour masks and faithfulness to the model.

Per method, over tumour images that have a mask:

* **pointing game**: the map's maximum lies inside the tumour mask (hit rate; no tolerance), also
  per tumour class; beside it, the same game with Zhang et al.'s (2016) 15-pixel tolerance (a peak
  within 15 image pixels of the mask counts) and the median distance of the misses - a peak on the
  oedema next to a glioma's drawn border and one on the other hemisphere are both plain misses;
* **Dice / IoU** of the adaptive binary mask (``threshold.adaptive_mask``) against the tumour mask;
* **deletion AUC** (Petsiuk et al. 2018): brain pixels of the network input are set to 0 in
  order of decreasing saliency, 5 % at a time; the area under the explained class's probability
  curve (lower = the map found what the model relies on). Two orders are reported beside it, per
  image: a random one (scattered pixels: a harsher perturbation than any map's contiguous blobs, so
  every map scores worse than it) and the same map **moved** by half the image in both directions
  (``deletion_auc_moved``: the same blobs in the wrong place), the fair floor: a faithful map's
  curve falls faster than its moved copy's.

The segmentation head's Dice on the same images is reported beside them. The explained class is
the most probable tumour class, as in ``explain``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from tqdm import tqdm

from tumorlens.data import read_image, read_mask
from tumorlens.data.manifest import load_manifest
from tumorlens.errors import InvalidInputError
from tumorlens.evaluation.metrics import dice_score, iou_score
from tumorlens.models.registry import LoadedModel, load_model
from tumorlens.saliency.cam import GRAD_METHODS, METHODS, class_logits
from tumorlens.saliency.maps import check_methods, saliency_maps
from tumorlens.saliency.threshold import adaptive_mask

DELETION_STEPS = 20
POINTING_TOLERANCE_PX = 15  # Zhang et al. 2016, "Top-down neural attention by excitation backprop"


def spread(items: list, n: int | None) -> list:
    """``n`` items spread evenly over the list (deterministic), or all of them."""
    if n is None or n >= len(items):
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


@torch.no_grad()
def deletion_curve(net, x: torch.Tensor, saliency: np.ndarray, target: int, steps: int = DELETION_STEPS,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Target probability after deleting 0, 1/steps, ..., all brain pixels of ``x`` [1, 1, S, S] in
    order of decreasing ``saliency`` [S, S] (or at random when ``rng`` is given)."""
    img = x[0, 0]
    brain = np.flatnonzero(img.numpy().ravel() > 0)
    if rng is None:
        order = brain[np.argsort(-saliency.ravel()[brain], kind="stable")]
    else:
        order = rng.permutation(brain)
    batch = img.repeat(steps + 1, 1, 1).reshape(steps + 1, -1).clone()
    for i in range(1, steps + 1):
        batch[i, order[: int(round(i / steps * len(order)))]] = 0.0
    probs = class_logits(net, batch.reshape(steps + 1, 1, *img.shape)).softmax(1)[:, target]
    return probs.numpy()


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoid rule)."""
    c = np.asarray(curve, dtype=float)
    return float(((c[1:] + c[:-1]) / 2).sum() / (len(c) - 1))


def _groups(methods: tuple[str, ...]) -> list[tuple[str, ...]]:
    grad = tuple(m for m in methods if m in GRAD_METHODS)
    return ([grad] if grad else []) + [(m,) for m in methods if m not in GRAD_METHODS]


def evaluate_saliency(data_dir: str | Path, methods=METHODS, n: int | None = 40,
                      model: LoadedModel | str | None = None, overlays_dir: str | Path | None = None,
                      n_overlays: int = 8, steps: int = DELETION_STEPS, layer: str | None = None) -> dict:
    """Metrics per method on ``n`` tumour images (with masks) of a manifest folder."""
    from tumorlens.inference import Predictor

    methods = check_methods(methods)
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    manifest = load_manifest(data_dir)
    records = [r for r in manifest if r.mask is not None and r.has_tumour]
    if not records:
        raise InvalidInputError(Path(data_dir) / "manifest.csv", "no tumour images with masks to evaluate saliency on")
    records = spread(records, n)
    predictor = Predictor(lm)
    rng = np.random.default_rng(0)
    per = {m: {"hit": [], "distance": [], "dice": [], "iou": [], "deletion_auc": [], "deletion_auc_moved": [],
               "percentile": [], "seconds": []} for m in methods}
    seg_dice, random_auc, rows, classes = [], [], [], []
    overlays = Path(overlays_dir) if overlays_dir else None
    written = []
    for i, rec in enumerate(tqdm(records, desc="evaluate-saliency", unit="img")):
        img = read_image(rec.image)
        truth = read_mask(rec.mask, like=img).numpy()[0] > 0
        to_tumour = ndi.distance_transform_edt(~truth) if truth.any() else np.full(truth.shape, np.inf)
        classes.append(rec.label)
        pred = predictor.predict(img)
        seg_dice.append(dice_score(pred.mask.numpy()[0], truth))
        row = {"index": i, "image": Path(str(rec.image)).name, "label": rec.label, "predicted": pred.label,
               "seg_dice": seg_dice[-1]}
        results = {}
        sals = {}
        for group in _groups(methods):  # Grad-CAM and Grad-CAM++ share one pass
            t0 = time.perf_counter()
            sal = saliency_maps(img, group, lm, probabilities=pred.probabilities, layer=layer)
            for m in group:
                sals[m] = sal
                per[m]["seconds"].append((time.perf_counter() - t0) / len(group))
        for m in methods:
            sal = sals[m]
            heat = sal.maps[m].numpy()[0]
            th = adaptive_mask(heat, sal.brain)
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            hit = bool(truth[peak])
            per[m]["distance"].append(float(to_tumour[peak]))
            d, j = dice_score(th.mask, truth), iou_score(th.mask, truth)
            per[m]["hit"].append(hit)
            per[m]["dice"].append(d)
            per[m]["iou"].append(j)
            per[m]["percentile"].append(th.percentile)
            row[m] = {"hit": hit, "distance_px": per[m]["distance"][-1], "dice": d, "iou": j, "percentile": th.percentile}
            if sal.net_input is not None and steps > 0:
                t = list(lm.labels).index(sal.target)
                curve = deletion_curve(lm.net, sal.net_input, sal.net_maps[m], t, steps)
                per[m]["deletion_auc"].append(auc(curve))
                row[m]["deletion_auc"] = per[m]["deletion_auc"][-1]
                moved = np.roll(sal.net_maps[m], tuple(n // 2 for n in sal.net_maps[m].shape), axis=(0, 1))
                per[m]["deletion_auc_moved"].append(auc(deletion_curve(lm.net, sal.net_input, moved, t, steps)))
                row[m]["deletion_auc_moved"] = per[m]["deletion_auc_moved"][-1]
                if m == methods[0]:
                    random_auc.append(auc(deletion_curve(lm.net, sal.net_input, sal.net_maps[m], t, steps, rng)))
                    row["random_deletion_auc"] = random_auc[-1]
            results[m] = (heat, th.mask, peak)
        rows.append(row)
        if overlays is not None and len(written) < n_overlays:
            written.append(str(write_eval_overlay(img, truth, pred.mask.numpy()[0] > 0, results, row,
                                                  overlays / f"{i:03d}_{rec.label}.png")))
    summary = {}
    for m in methods:
        p = per[m]
        hits, dist = np.array(p["hit"]), np.array(p["distance"])
        summary[m] = {
            "pointing_game": float(hits.mean()),
            "pointing_game_per_class": {c: float(hits[np.array(classes) == c].mean()) for c in sorted(set(classes))},
            "pointing_game_tolerant": float((dist <= POINTING_TOLERANCE_PX).mean()),
            "miss_distance_px_median": float(np.median(dist[~hits])) if (~hits).any() else None,
            "dice": float(np.mean(p["dice"])),
            "iou": float(np.mean(p["iou"])),
            "deletion_auc": float(np.mean(p["deletion_auc"])) if p["deletion_auc"] else None,
            "deletion_auc_moved": float(np.mean(p["deletion_auc_moved"])) if p["deletion_auc_moved"] else None,
            # images whose curve falls faster than the moved map's
            "deletion_faster_than_moved": float(np.mean(np.array(p["deletion_auc"]) < np.array(p["deletion_auc_moved"])))
            if p["deletion_auc"] else None,
            "percentile_mean": float(np.mean(p["percentile"])),
            "percentile_range": [float(np.min(p["percentile"])), float(np.max(p["percentile"]))],
            "seconds_per_image": float(np.mean(p["seconds"])),  # shared pass split evenly
        }
    out = {
        "data": str(Path(data_dir).name),
        "model": {"name": lm.name, "version": lm.version},
        "layer": layer or lm.net.cam_layer,
        "n_images": len(records),
        "pointing_tolerance_px": POINTING_TOLERANCE_PX,
        "methods": summary,
        "segmentation_head": {"dice": float(np.mean(seg_dice))},
        "random_deletion_auc": float(np.mean(random_auc)) if random_auc else None,
        "best_pointing_game": max(methods, key=lambda m: summary[m]["pointing_game"]),
        "best_dice": max(methods, key=lambda m: summary[m]["dice"]),
        "per_image": rows,
        "overlays": written,
    }
    if "gradcam" in methods and "gradcampp" in methods:
        a, b = summary["gradcampp"], summary["gradcam"]
        out["gradcampp_vs_gradcam"] = {
            "dice_difference": a["dice"] - b["dice"],
            "pointing_difference": a["pointing_game"] - b["pointing_game"],
            "gradcampp_better_overlap": a["dice"] > b["dice"],
            "images_where_gradcampp_dice_higher": int(np.sum(np.array(per["gradcampp"]["dice"]) >
                                                             np.array(per["gradcam"]["dice"]))),
        }
    return out


def write_eval_overlay(img, truth: np.ndarray, seg: np.ndarray, results: dict, row: dict, path: Path) -> Path:
    """One PNG: the image with the tumour (green) and seg head (cyan), then each method's map,
    its mask (red) and its maximum (white cross)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tumorlens.atomic import atomic_write
    from tumorlens.data.normalize import normalize_intensity

    base = normalize_intensity(img.numpy()[0].astype(np.float32))
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(3.2 * (1 + len(results)), 3.9))
    axes[0].imshow(base, cmap="gray", vmin=0, vmax=1)
    axes[0].contour(truth.astype(float), levels=[0.5], colors=["lime"], linewidths=1)
    if seg.any():
        axes[0].contour(seg.astype(float), levels=[0.5], colors=["cyan"], linewidths=1, linestyles="dashed")
    axes[0].set_title(f"{row['label']} -> {row['predicted']}\nseg Dice {row['seg_dice']:.2f}", fontsize=9)
    for ax, (m, (heat, mask, peak)) in zip(axes[1:], results.items(), strict=True):
        ax.imshow(base, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_less(heat, 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.contour(truth.astype(float), levels=[0.5], colors=["lime"], linewidths=1)
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=["red"], linewidths=1)
        ax.plot(peak[1], peak[0], "w+", markersize=12, markeredgewidth=2)
        r = row[m]
        ax.set_title(f"{m}: {'hit' if r['hit'] else 'miss'}, Dice {r['dice']:.2f}\nmask above percentile "
                     f"{r['percentile']:.1f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.text(0.5, 0.01, "green: expert tumour mask; cyan dashed: segmentation head; red: saliency mask; white +: the "
             "map's maximum (a hit when inside green)", ha="center", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.08, top=0.86, wspace=0.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path
