"""Alignment as a training loss (option b of issue 8): ``alignment: {enabled: true, weight: 0.5}`` in a
training config adds ``weight * alignment_loss(TextProjection(pooled features), labels, prototypes)``
to the joint loss. The pooled features are captured with a forward hook on the classifier's flatten
layer, so the encoder runs once per step (no second ``net.embed`` pass).

Use in a training loop (three lines)::

    term = AlignmentTerm.from_config(cfg, net)              # None when alignment is not enabled
    params = list(net.parameters()) + (term.parameters() if term else [])
    ...
    logits, seg = net(x)
    loss = ce(logits, y) + sw * seg_loss + (term.loss(y) if term else 0.0)
"""

from __future__ import annotations

import torch
from torch import nn

from tumorlens.alignment.projection import DEFAULT_TEMPERATURE, TextProjection, alignment_loss

DEFAULTS = {"enabled": False, "weight": 0.5, "temperature": DEFAULT_TEMPERATURE, "pull": 0.5, "prompts": None}


class AlignmentTerm(nn.Module):
    def __init__(self, net: nn.Module, prototypes: torch.Tensor, weight: float = 0.5,
                 temperature: float = DEFAULT_TEMPERATURE, pull: float = 0.5):
        super().__init__()
        in_dim = net.classifier[-1].in_features
        self.projection = TextProjection(in_dim, prototypes.shape[1], dropout=0.0)
        self.register_buffer("prototypes", prototypes.float())
        self.weight, self.temperature, self.pull = float(weight), float(temperature), float(pull)
        self._feats: torch.Tensor | None = None
        self._handle = net.classifier[2].register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output) -> None:
        self._feats = output

    @classmethod
    def from_config(cls, cfg: dict, net: nn.Module) -> AlignmentTerm | None:
        a = {**DEFAULTS, **(cfg.get("alignment") or {})}
        if not a["enabled"]:
            return None
        from tumorlens.alignment.prompts import load_descriptions
        from tumorlens.alignment.text import build_prototypes

        protos = torch.as_tensor(build_prototypes(load_descriptions(a["prompts"]))["prototypes"])
        p = next(net.parameters())
        return cls(net, protos, a["weight"], a["temperature"], a["pull"]).to(p.device)

    def parameters(self, recurse: bool = True) -> list[nn.Parameter]:  # type: ignore[override]
        return list(super().parameters(recurse))

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """``weight * alignment_loss`` on the features of the last forward pass of the net."""
        if self._feats is None:
            raise RuntimeError("run the network forward before AlignmentTerm.loss")
        f, self._feats = self._feats, None
        return self.weight * alignment_loss(self.projection(f.float()), labels, self.prototypes,
                                            self.temperature, self.pull)

    def detach(self) -> None:
        """Remove the hook (after training)."""
        self._handle.remove()
