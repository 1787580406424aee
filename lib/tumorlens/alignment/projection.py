"""Projection of pooled image features into the frozen text space, and the prototype loss that trains it.

Usable in two ways: post-hoc on a trained model's frozen encoder (``fit_projection``), or as an extra
loss term during training (``alignment_loss`` on ``TextProjection(net.embed(x))``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_TEMPERATURE = 0.07


class TextProjection(nn.Module):
    """Standardise pooled features, then a linear (or one-hidden-layer) map to the text dimension."""

    def __init__(self, in_dim: int, text_dim: int = 384, hidden: int = 0, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, text_dim)]
        else:
            layers += [nn.Linear(in_dim, text_dim)]
        self.mlp = nn.Sequential(*layers)
        self.in_dim, self.text_dim, self.hidden = in_dim, text_dim, hidden

    def set_standardisation(self, feats: torch.Tensor) -> None:
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-4))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Unit-length text-space embeddings [B, text_dim]."""
        return F.normalize(self.mlp((f - self.mean) / self.std), dim=-1)


def alignment_loss(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                   temperature: float = DEFAULT_TEMPERATURE, pull: float = 0.5) -> torch.Tensor:
    """Prototype loss on text-space embeddings ``features`` [B, D] (e.g. ``TextProjection(net.embed(x))``):
    cross-entropy of ``cos(features, prototypes) / temperature`` plus ``pull * (1 - cos(own prototype))``.

    The CE term separates classes in text space; the pull term keeps the image near its description,
    which is what free-text retrieval and a positive semantic margin need.
    """
    z = F.normalize(features, dim=-1)
    p = F.normalize(prototypes.to(z), dim=-1)
    sims = z @ p.T
    ce = F.cross_entropy(sims / temperature, labels)
    own = sims.gather(1, labels[:, None]).squeeze(1)
    return ce + pull * (1.0 - own).mean()


def fit_projection(feats: np.ndarray, labels: np.ndarray, prototypes: np.ndarray, *, hidden: int = 0,
                   epochs: int = 30, batch: int = 256, lr: float = 3e-3, weight_decay: float = 1e-3,
                   temperature: float = DEFAULT_TEMPERATURE, pull: float = 0.5, seed: int = 0,
                   optimizer: str = "adamw") -> TextProjection:
    """Train a projection on frozen features (seconds on CPU); deterministic for a given seed.
    ``optimizer``: any name ``tumorlens.training.train.make_optimizer`` knows (the stability grid varies it)."""
    from tumorlens.training.train import make_optimizer

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(feats, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    p = torch.as_tensor(prototypes, dtype=torch.float32)
    proj = TextProjection(x.shape[1], p.shape[1], hidden=hidden)
    proj.set_standardisation(x)
    opt = make_optimizer(optimizer, proj.parameters(), lr, weight_decay)
    n = len(x)
    steps = epochs * max(1, (n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    proj.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            loss = alignment_loss(proj(x[idx]), y[idx], p, temperature, pull)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return proj.eval()


def fit_linear_probe(feats: np.ndarray, labels: np.ndarray, prototypes: np.ndarray, ridge: float = 1.0) -> TextProjection:
    """The plain model's way into text space: ridge regression of standardised features onto the
    own-class prototype (no classification objective), so its semantic margin is a fair baseline."""
    x = torch.as_tensor(feats, dtype=torch.float64)
    proj = TextProjection(x.shape[1], prototypes.shape[1], hidden=0, dropout=0.0)
    proj.set_standardisation(x.float())
    xs = (x - proj.mean.double()) / proj.std.double()
    xs1 = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    y = torch.as_tensor(prototypes, dtype=torch.float64)[torch.as_tensor(labels, dtype=torch.long)]
    reg = ridge * len(xs) * torch.eye(xs1.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0
    w = torch.linalg.solve(xs1.T @ xs1 + reg, xs1.T @ y)
    lin = proj.mlp[-1]
    with torch.no_grad():
        lin.weight.copy_(w[:-1].T.float())
        lin.bias.copy_(w[-1].float())
    return proj.eval()
