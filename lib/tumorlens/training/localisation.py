"""Localisation loss: the classifier's own Grad-CAM, at a chosen layer, is pulled into the tumour.

Why: a classifier trained on labels alone may decide from context (view, skull, scanner) and its
Grad-CAM then points anywhere but the lesion (pointing game 0.03 for the first shipped model), which
makes every saliency-derived mask and atlas region meaningless. With masks at hand (the seg head is
trained on them anyway), the explanation itself can be trained: for each tumour image with a mask,

    cam   = sum_k mean_xy(dy/dA_k) * A_k              (Grad-CAM of the true class, before the ReLU)
    loss  = - sum_cells q * log softmax(s * cam / max|cam|)

where q is the mask's share of each cell of the layer's grid (``kind: share``, the default). That asks
the map to cover every part of the lesion in proportion, which a diffuse glioma map never does; the
pointing game only asks where the map peaks. ``kind: inside`` trains exactly that, as a
multiple-instance loss: with p = softmax(s * cam) over the cells and a the fraction of each cell inside
the tumour,

    loss  = - log sum_cells p * a

the log-probability that the (soft) peak of the map lies inside the lesion, wherever in it (cycle 15:
pointing 0.723 -> 0.80 on the validation tumours, gliomas 0.57 -> 0.70). The gradient of the class score
is taken with ``create_graph=True`` (double backpropagation), so the loss shapes both what the layer sees and
how the classifier weighs it - "right for the right reasons" training, with the mask as the reason.
A stride-8 layer is needed for the pointing game: at 128 px a stride-32 map has 4x4 cells and only
29 % of the validation tumours cover a cell centre (66 % at stride 16, 96 % at stride 8).

``train: {localisation: {weight: 1.0, layer: encoder.stages.2}}`` in a training config; the layer is
then the model's ``cam_layer`` (saved in its config), the one every saliency method uses.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES, NO_TUMOUR

DEFAULTS = {"weight": 0.0, "layer": None, "sharpness": 10.0, "kind": "share"}
KINDS = ("share", "inside")


def check_kind(kind) -> str:
    """The loss kind, or InvalidInputError naming the config key (``train`` calls it before reading data)."""
    if kind not in KINDS:
        raise InvalidInputError(None, f"train.localisation.kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind


class LocalisationTerm:
    def __init__(self, net: nn.Module, layer: str, weight: float = 1.0, sharpness: float = 10.0,
                 kind: str = "share"):
        self.layer, self.weight, self.sharpness, self.kind = layer, float(weight), float(sharpness), check_kind(kind)
        self._acts: torch.Tensor | None = None
        self._handle = net.get_submodule(layer).register_forward_hook(self._capture)
        self._no_tumour = CLASS_NAMES.index(NO_TUMOUR)

    def _capture(self, _module, _inputs, output) -> None:
        self._acts = output

    @classmethod
    def from_config(cls, tc: dict, net: nn.Module) -> LocalisationTerm | None:
        c = {**DEFAULTS, **(tc.get("localisation") or {})}
        if float(c["weight"]) <= 0:
            return None
        layer = c["layer"] or net.cam_layer
        return cls(net, layer, float(c["weight"]), float(c["sharpness"]), str(c["kind"]))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``weight`` x the loss of ``kind`` on the softmaxed Grad-CAM (0 when the batch has no tumour
        image with a mask). Call right after the forward pass."""
        acts, self._acts = self._acts, None
        if acts is None:
            raise RuntimeError("run the network forward before LocalisationTerm.loss")
        has = (masks.flatten(1).amax(1) > 0) & (labels != self._no_tumour)
        if not bool(has.any()):
            return logits.new_zeros(())
        idx = torch.nonzero(has).flatten()
        score = logits[idx, labels[idx]].sum()
        grads = torch.autograd.grad(score, acts, create_graph=True)[0][idx].float()
        a = acts[idx].float()  # bfloat16 under autocast: the map and its softmax in float32
        dims = tuple(range(2, a.ndim))
        cam = (grads.mean(dims, keepdim=True) * a).sum(1).flatten(1)  # [n, cells]
        cam = cam / (cam.abs().amax(1, keepdim=True).detach() + 1e-6)
        pool = F.adaptive_avg_pool2d if a.ndim == 4 else F.adaptive_avg_pool3d
        share = pool(masks[idx].float(), a.shape[2:]).flatten(1)  # fraction of each cell inside the lesion
        logp = F.log_softmax(self.sharpness * cam, dim=1)
        if self.kind == "inside":
            return self.weight * -torch.logsumexp(logp + torch.log(share.clamp_min(1e-12)), dim=1).mean()
        q = share / share.sum(1, keepdim=True).clamp_min(1e-8)
        return self.weight * -(q * logp).sum(1).mean()

    def detach(self) -> None:
        self._handle.remove()
