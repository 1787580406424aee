"""Metrics with no model or I/O inside: arrays in, numbers out."""

from __future__ import annotations

import numpy as np

from tumorlens.labels import NO_TUMOUR


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; two empty masks agree perfectly (1.0)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(p, t).sum() / s)


def iou_score(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    u = np.logical_or(p, t).sum()
    return 1.0 if u == 0 else float(np.logical_and(p, t).sum() / u)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence, equal-width bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names) -> dict:
    labels = np.asarray(labels, int)
    probs = np.asarray(probs, float)
    names = list(class_names)
    k = len(names)
    pred = probs.argmax(1)
    conf = np.zeros((k, k), int)
    for t, p in zip(labels, pred, strict=True):
        conf[t, p] += 1
    per_class = {}
    recalls = []
    for i, n in enumerate(names):
        tp = conf[i, i]
        support = int(conf[i].sum())
        prec = tp / conf[:, i].sum() if conf[:, i].sum() else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[n] = {"precision": float(prec), "recall": float(rec), "f1": float(f1), "n": support}
        if support:
            recalls.append(rec)
    tumour_idx = [i for i, n in enumerate(names) if n != NO_TUMOUR]
    is_tumour = np.isin(labels, tumour_idx)
    if is_tumour.any():
        tpred = np.asarray(tumour_idx)[probs[is_tumour][:, tumour_idx].argmax(1)]
        tacc = float((tpred == labels[is_tumour]).mean())
    else:
        tacc = float("nan")
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "tumour_only_accuracy": tacc,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "per_class": per_class,
        "confusion": {"labels": names, "matrix": conf.tolist()},
        "ece": expected_calibration_error(labels, probs),
    }


def grouped_bootstrap(labels: np.ndarray, probs: np.ndarray, class_names, groups, dice: np.ndarray | None = None,
                      resamples: int = 2000, level: float = 0.95, seed: int = 0,
                      baseline: np.ndarray | None = None) -> dict:
    """Percentile confidence intervals of accuracy, tumour-only accuracy and seg Dice, resampling whole
    groups (patients) with replacement. A statistic with no image to measure it on (tumour-only accuracy
    of a folder without tumour images) gets no interval.

    Images of one patient are not independent, so an image-level interval would be too narrow; the
    cluster bootstrap resamples the unit the split is made of (a manifest without a ``group`` column makes
    every image its own group). ``dice`` holds each image's seg Dice, NaN where the image has no mask.
    ``baseline``: another decision's probabilities on the same images; then ``accuracy_gain`` and
    ``tumour_only_accuracy_gain`` (``probs`` minus ``baseline``) get intervals from the same draws (paired).
    """
    labels = np.asarray(labels, int)
    probs = np.asarray(probs, float)
    _, gidx = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(gidx.max()) + 1 if len(gidx) else 0
    tumour_idx = [i for i, n in enumerate(class_names) if n != NO_TUMOUR]
    is_tumour = np.isin(labels, tumour_idx)
    def tumour_pred(p: np.ndarray) -> np.ndarray:
        return np.asarray(tumour_idx)[p[:, tumour_idx].argmax(1)]

    def per_group(values: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.bincount(gidx[sel], weights=values[sel], minlength=n_groups),
                np.bincount(gidx[sel], minlength=n_groups).astype(float))

    parts = {"accuracy": per_group((probs.argmax(1) == labels).astype(float), np.ones(len(labels), bool)),
             "tumour_only_accuracy": per_group((tumour_pred(probs) == labels).astype(float), is_tumour)}
    if baseline is not None:
        baseline = np.asarray(baseline, float)
        parts["accuracy_gain"] = per_group((probs.argmax(1) == labels).astype(float)
                                           - (baseline.argmax(1) == labels), np.ones(len(labels), bool))
        parts["tumour_only_accuracy_gain"] = per_group((tumour_pred(probs) == labels).astype(float)
                                                       - (tumour_pred(baseline) == labels), is_tumour)
    if dice is not None and np.isfinite(dice).any():
        ok = np.isfinite(dice)
        parts["seg_dice"] = per_group(np.nan_to_num(dice), ok)
    out = {"method": "cluster bootstrap over manifest groups (percentile interval)", "groups": n_groups,
           "resamples": int(resamples), "level": float(level)}
    if n_groups < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(resamples, n_groups))
    counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws])  # [R, G] times each group is drawn
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    for name, (s, c) in parts.items():
        if not c.any():  # nothing to measure (e.g. no tumour image): no interval, not an empty percentile
            continue
        den = counts @ c
        stat = (counts @ s)[den > 0] / den[den > 0]
        out[name] = [float(np.percentile(stat, lo)), float(np.percentile(stat, hi))]
    return out
