"""Predictive uncertainty of the classifier: MC-dropout over the classification head, or test-time
augmentation (flips and small shifts) over the whole network.

The dual-head network's only dropout sits between the pooled features and the linear classifier,
so MC-dropout runs the encoder once and samples the head ``passes`` times: exact, and cheap.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.data import MetaTensor
from torch.nn import functional as F

from tumorlens.activelearning.inputs import network_inputs
from tumorlens.models.registry import LoadedModel

METHODS = ("mc_dropout", "tta")


def predictive_entropy(p: np.ndarray) -> float:
    """Entropy (nats) of a probability vector."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def mc_dropout_samples(model: LoadedModel, x: torch.Tensor, passes: int = 30, seed: int = 0) -> torch.Tensor:
    """``[passes, N, C]`` class probabilities with the head's dropout active."""
    net = model.net
    head = net.classifier
    drop = next((m for m in head if isinstance(m, torch.nn.Dropout)), None)
    linear = head[-1]
    p_drop = float(drop.p) if drop is not None else 0.0
    feats = net.encoder(x)[-1]
    pooled = head[2](head[1](head[0](feats)))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(passes):
        if p_drop > 0:
            keep = (torch.rand(pooled.shape, generator=gen) >= p_drop).to(pooled.dtype) / (1.0 - p_drop)
            z = pooled * keep
        else:
            z = pooled
        out.append(linear(z).softmax(1))
    return torch.stack(out)


@torch.no_grad()
def tta_samples(model: LoadedModel, x: torch.Tensor, passes: int = 8, seed: int = 0) -> torch.Tensor:
    """``[passes, N, C]`` probabilities under flips and shifts of up to 6 % of the image."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(passes):
        xi = x.flip(-1) if i % 2 else x
        if i > 0:
            shift = ((torch.rand(2, generator=gen) * 2 - 1) * 0.06).tolist()
            theta = torch.tensor([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]]).expand(len(x), 2, 3)
            grid = F.affine_grid(theta, list(xi.shape), align_corners=False)
            xi = F.grid_sample(xi, grid, align_corners=False, padding_mode="zeros")
        logits, _ = model.net(xi)
        out.append(logits.softmax(1))
    return torch.stack(out)


def image_uncertainty(model: LoadedModel, img: MetaTensor, method: str = "mc_dropout", passes: int | None = None,
                      max_slices: int = 8) -> dict:
    """Uncertainty of one image: predictive entropy of the mean prediction (normalised to [0, 1] by
    ln C), mutual information between prediction and sampled weights (BALD), and the mean
    probabilities. For volumes, averaged over representative slices."""
    if method not in METHODS:
        raise ValueError(f"unknown uncertainty method {method!r}: one of {', '.join(METHODS)}")
    x = network_inputs(img, model.image_size, max_slices=max_slices)
    model.net.eval()
    if method == "mc_dropout":
        s = mc_dropout_samples(model, x, passes or 30)
    else:
        s = tta_samples(model, x, passes or 8)
    s = s.double().numpy()  # [T, N, C]
    mean = s.mean(0)  # [N, C]
    ent = np.array([predictive_entropy(m) for m in mean])
    exp_ent = np.array([[predictive_entropy(si) for si in st] for st in s.transpose(1, 0, 2)]).mean(1)
    c = s.shape[-1]
    probs = mean.mean(0)
    return {
        "method": method,
        "passes": int(s.shape[0]),
        "slices": int(s.shape[1]),
        "entropy": float(ent.mean()),
        "entropy_normalised": float(ent.mean() / math.log(c)),
        "mutual_information": float(np.maximum(ent - exp_ent, 0).mean()),
        "probabilities": {lab: float(p) for lab, p in zip(model.labels, probs, strict=True)},
    }
