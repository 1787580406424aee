"""Semantic margin: how far an image's text-space vector is closer to its own class prototype than to
the best other one. The *rate* is the share of images with a positive margin (TumorCLIP's metric)."""

from __future__ import annotations

import numpy as np
import torch


def semantic_margins(text_vectors, labels, prototypes) -> np.ndarray:
    """``cos(t, P_own) - max_{c != own} cos(t, P_c)`` per image; inputs need not be unit length."""
    t = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text_vectors), dtype=torch.float32), dim=-1)
    p = torch.nn.functional.normalize(torch.as_tensor(np.asarray(prototypes), dtype=torch.float32), dim=-1)
    return own_minus_best_other(t @ p.T, labels)


def own_minus_best_other(similarities, labels) -> np.ndarray:
    """``sims[own] - max_{c != own} sims[c]`` per row of ``similarities`` [N, C] (cosines to the prototypes)."""
    sims = torch.as_tensor(np.asarray(similarities), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    own = sims.gather(1, y[:, None]).squeeze(1)
    other = sims.scatter(1, y[:, None], float("-inf")).max(1).values
    return (own - other).numpy()


def margin_rate(margins: np.ndarray, min_margin: float = 0.0) -> float:
    """Share of margins strictly greater than ``min_margin``."""
    m = np.asarray(margins)
    return float((m > min_margin).mean()) if m.size else float("nan")
