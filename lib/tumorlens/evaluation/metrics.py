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
