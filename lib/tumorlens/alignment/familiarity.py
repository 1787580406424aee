"""Familiarity: how close an image's features lie to the training images' (k-NN in the Tip-Adapter cache).

Why: the classifier answers with one of its four classes whatever it is shown — a CT slice, a photograph,
a brain MRI of another sequence or scanner. Softmax confidence does not say when that answer stands on
nothing the network has seen; the distance to the nearest training images in feature space does (deep
k-NN out-of-distribution detection, Sun et al., ICML 2022). The Tip-Adapter cache already holds every
training image's pooled feature (centred, L2-normalised), so the score costs one matrix product.

* score: cosine similarity to the ``K``-th nearest training image (k = 5: one near-duplicate training
  slice of the same patient cannot vouch for an image on its own).
* threshold: the ``QUANTILE`` (1 %) quantile of the score over the grouped validation split, set by
  ``tumorlens align``; so about 1 % of images like the validation ones are flagged by construction.

A second measure, the layer score (``tumorlens.alignment.layer_statistics``: distances of the encoder's
stage statistics), catches pictures whose deepest features happen to lie near training slices; an image is
familiar only when both pass.

The flag goes into the findings record (``classification.familiarity``, plus a note the report carries);
it never changes the class decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tumorlens.alignment.layer_statistics import DECIMALS as LAYER_DECIMALS
from tumorlens.alignment.layer_statistics import unfamiliar_layers
from tumorlens.alignment.tip_adapter import TipAdapter

K = 5
QUANTILE = 0.01
DECIMALS = 4  # scores and thresholds are recorded, and compared, at this precision


def unfamiliar(scores, threshold: float) -> np.ndarray:
    """The one flagging rule (per image and in dataset summaries): score below threshold, as recorded."""
    return np.round(np.asarray(scores, dtype=np.float64), DECIMALS) < round(float(threshold), DECIMALS)


def knn_similarity(cache: TipAdapter, feats, k: int = K) -> np.ndarray:
    """[N] cosine similarity of each feature row to its ``k``-th nearest cache key."""
    sims = cache.normalise(torch.as_tensor(feats, dtype=torch.float32)) @ cache.keys.T
    k = max(1, min(int(k), sims.shape[1]))
    return sims.topk(k, dim=1).values[:, -1].numpy()


def calibrate(cache: TipAdapter, val_feats, k: int = K, quantile: float = QUANTILE) -> dict:
    """Threshold from in-distribution (grouped validation) features; stored in the aligned head's meta."""
    s = knn_similarity(cache, val_feats, k)
    if s.size == 0:
        raise ValueError("no validation features to calibrate familiarity on")
    return {"k": int(k), "quantile": float(quantile), "threshold": float(np.quantile(s, quantile)),
            "n": int(s.size), "validation_median": float(np.median(s))}


@dataclass(frozen=True)
class Familiarity:
    """One image's (or volume's) score against the calibrated threshold, both to 4 decimals as recorded, and,
    when the model carries layer statistics, its layer score against theirs (``layer_statistics``, 3 decimals).
    ``familiar`` needs both: the k-NN score at or above its threshold, the layer score at or below its own."""

    score: float
    threshold: float
    k: int
    layer_score: float | None = None
    layer_threshold: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "score", round(float(self.score), DECIMALS))
        object.__setattr__(self, "threshold", round(float(self.threshold), DECIMALS))
        if self.layer_score is not None:
            object.__setattr__(self, "layer_score", round(float(self.layer_score), LAYER_DECIMALS))
            object.__setattr__(self, "layer_threshold", round(float(self.layer_threshold), LAYER_DECIMALS))

    @property
    def familiar(self) -> bool:
        if unfamiliar(self.score, self.threshold):
            return False
        return self.layer_score is None or not bool(unfamiliar_layers(self.layer_score, self.layer_threshold))

    def as_dict(self) -> dict:
        d = {"score": self.score, "threshold": self.threshold, "k": self.k, "familiar": self.familiar}
        if self.layer_score is not None:
            d |= {"layer_score": self.layer_score, "layer_threshold": self.layer_threshold}
        return d


def assess(cache: TipAdapter | None, calibration: dict | None, feats) -> np.ndarray | None:
    """Per-row scores, or None when the head carries no cache or no calibration (older alignment files)."""
    if cache is None or not calibration:
        return None
    return knn_similarity(cache, feats, int(calibration["k"]))
