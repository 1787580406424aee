"""Tip-Adapter (Zhang et al., 2022) cache over a trained model's pooled features.

Keys are the training images' features (centred on the training mean, then L2-normalised: pooled
post-ReLU features are all positive, so raw cosines crowd near 1); values are one-hot labels,
re-weighted per class so that a class with more training images does not get a larger cache logit.
``scores(f) = A @ V`` with affinities ``A = exp(-beta * (1 - cos(f, keys)))``, returned normalised to
sum 1 per image (then ``alpha`` alone sets the cache's weight, independent of beta and cache size).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


class TipAdapter:
    def __init__(self, keys: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int,
                 beta: float = 5.5, mean: torch.Tensor | None = None):
        k = torch.as_tensor(keys, dtype=torch.float32)
        self.mean = k.mean(0) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.keys = F.normalize(k - self.mean, dim=-1)
        y = torch.as_tensor(labels, dtype=torch.long)
        self.labels = y
        onehot = F.one_hot(y, num_classes).float()
        counts = onehot.sum(0).clamp_min(1)
        self.values = onehot * (len(y) / (num_classes * counts))
        self.beta = float(beta)
        self.num_classes = num_classes

    def normalise(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.as_tensor(feats, dtype=torch.float32) - self.mean, dim=-1)

    def affinity(self, feats: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """[B, N] ``exp(-beta (1 - cos))``."""
        b = self.beta if beta is None else float(beta)
        return torch.exp(-b * (1.0 - self.normalise(feats) @ self.keys.T))

    def scores(self, feats: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """Cache class scores [B, C], rows summing to 1."""
        s = self.affinity(feats, beta) @ self.values
        return s / s.sum(1, keepdim=True).clamp_min(1e-12)

    def state(self) -> dict:
        return {"keys": self.keys.half(), "labels": self.labels, "mean": self.mean, "beta": self.beta,
                "num_classes": self.num_classes}

    @classmethod
    def from_state(cls, st: dict) -> TipAdapter:
        obj = cls.__new__(cls)
        obj.keys = st["keys"].float()
        obj.labels = st["labels"].long()
        obj.mean = st["mean"].float()
        obj.beta = float(st["beta"])
        obj.num_classes = int(st["num_classes"])
        onehot = F.one_hot(obj.labels, obj.num_classes).float()
        obj.values = onehot * (len(obj.labels) / (obj.num_classes * onehot.sum(0).clamp_min(1)))
        return obj
