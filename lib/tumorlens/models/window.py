"""Lesion-window classifier: a second opinion on the tumour type from the lesion at the slice's own pixels.

Why: the dual-head network decides from the whole slice at 128 px, half the training slices' 256 px, and
most of its errors are one tumour type read as another (glioma as meningioma above all). Cheng et al.
(PLoS ONE 2015), who published these figshare slices, found the tumour region and its rim carry the type.
Small ResNets look only at the window the lesion refiner uses (``tumorlens.models.refiner``: the
largest part of the product's mask plus a rim, sampled to 96 x 96 from the slice itself) and give the
three tumour types' probabilities. They decide in the frozen text space of the aligned head (issue 8):
their logits are scaled cosines to its class prototypes, so the fused decision is itself the nearest
prototype of one text-space vector (``product_text_vector``), whose semantic margin and nearest class
descriptions the product reports.

It only re-weighs the tumour types of a slice the dual-head network already calls a tumour
(``fuse``: a weighted geometric mean of the two opinions over the three types, sharpened or softened,
tumour versus no tumour left to the dual-head network), so it can change which tumour is named, never
whether one is. The two numbers of the fusion (the window's share and the sharpness) are fitted by
log-loss on the model's grouped validation part, as a temperature is in calibration: the network is
sure of itself even where it is wrong, and equal shares let it outvote a window that is right. The
classifier is stored beside a model only when the fused decision, with the fusion refitted without each
patient group in turn, is more accurate than the model alone there (``tumorlens train-window``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from monai.networks.nets import ResNet
from torch import nn
from torch.nn import functional as F

from tumorlens.errors import ModelNotFoundError
from tumorlens.labels import CLASS_NAMES, TUMOUR_CLASSES
from tumorlens.models.beside import load_beside, load_fp16, save_fp16
from tumorlens.models.refiner import CROP, crop_grid, lesion_box, lesion_window, normalise_crop, sample

WINDOW_FILE = "window_classifier.pt"
WIDTHS = (32, 64, 128, 256)  # a quarter of ResNet18's channels: 2.8 M weights, 5.6 MB in fp16 per member
INITIAL_SCALE, MAX_SCALE = 10.0, 100.0  # the cosine logits' learnt scale (an inverse temperature)
WINDOW_WEIGHT = 0.5  # share of the window's opinion in the geometric mean, for a file stored without a fitted fusion


class TextAnchoredWindowNet(nn.Module):
    """Small ResNets whose last layer projects the window into the frozen text space; their logits are scaled
    cosines to the class prototypes (TumorCLIP's anchoring, as the aligned head's are).

    With several members (trained from different seeds) the logits are their mean, which is the inner
    product of the prototypes with the mean of the members' scaled vectors: the ensemble is still one vector
    in text space (``scaled``). ``forward`` gives the three tumour types' logits; ``class_logits`` all four
    classes' (training also pushes the window away from the no-tumour prototype, so the product's text-space
    vector keeps the network's tumour call); ``embed`` the unit text-space vector."""

    def __init__(self, prototypes: torch.Tensor, channels: int = 1, members: int = 1):
        super().__init__()
        protos = torch.as_tensor(prototypes, dtype=torch.float32)
        if protos.ndim != 2 or protos.shape[0] != len(CLASS_NAMES):
            raise ValueError(f"expected {len(CLASS_NAMES)} class prototypes [C, D], got {tuple(protos.shape)}")
        if members < 1:
            raise ValueError(f"a window classifier needs at least one member, got {members}")
        self.backbones = nn.ModuleList(
            ResNet(block="basic", layers=(2, 2, 2, 2), block_inplanes=list(WIDTHS), spatial_dims=2,
                   n_input_channels=channels, num_classes=protos.shape[1], conv1_t_stride=2) for _ in range(members))
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))
        self.log_scales = nn.Parameter(torch.full((members,), math.log(INITIAL_SCALE)))
        self.register_buffer("types", torch.tensor([CLASS_NAMES.index(c) for c in TUMOUR_CLASSES]))

    @property
    def members(self) -> int:
        return len(self.backbones)

    @property
    def scales(self) -> torch.Tensor:
        return self.log_scales.clamp(max=math.log(MAX_SCALE)).exp()

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D]: the mean of the members' unit text-space vectors times their scales (logits = this @ P.T)."""
        s = self.scales
        return sum(s[k] * F.normalize(b(x), dim=-1) for k, b in enumerate(self.backbones)) / self.members

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.scaled(x), dim=-1)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x) @ self.prototypes.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_logits(x)[:, self.types]


def build_window_net(prototypes: torch.Tensor, channels: int = 1, members: int = 1) -> TextAnchoredWindowNet:
    return TextAnchoredWindowNet(prototypes, channels, members)


def join_members(nets: list[TextAnchoredWindowNet]) -> TextAnchoredWindowNet:
    """One network whose members are those of ``nets`` (same prototypes and inputs)."""
    first = nets[0]
    joined = build_window_net(first.prototypes, first.backbones[0].conv1.in_channels, sum(n.members for n in nets))
    with torch.no_grad():
        for k, b in enumerate(m for n in nets for m in n.backbones):
            joined.backbones[k].load_state_dict(b.state_dict())
        joined.log_scales.copy_(torch.cat([n.log_scales.detach().cpu() for n in nets]))
    return joined


def window_crop(arr: np.ndarray, mask: np.ndarray, crop: int = CROP,
                scales: tuple[float, ...] = (1.0,)) -> np.ndarray | None:
    """The normalised windows [len(scales), crop, crop] around the largest part of ``mask`` on slice ``arr``
    (each ``scale`` times the lesion window: 1 is the refiner's window, 2 shows twice as much of the
    surroundings), or None."""
    box = lesion_box(mask)
    if box is None:
        return None
    cy, cx, side = box
    a = arr.astype(np.float32)
    return np.stack([normalise_crop(sample(a, crop_grid(arr.shape, cy, cx, s * lesion_window(side), crop)))
                     for s in scales])


def tumour_types(probs: np.ndarray, labels: tuple[str, ...] | list[str]) -> tuple[list[int], float, np.ndarray]:
    """(indices of ``TUMOUR_CLASSES`` in ``labels``, the tumour probability, the type distribution: the
    tumour classes' probabilities renormalised, zeros when there is no tumour mass)."""
    labels = list(labels)
    idx = [labels.index(c) for c in TUMOUR_CLASSES]
    t = np.asarray(probs, np.float64)[idx]
    mass = float(t.sum())
    return idx, mass, t / mass if mass > 0 else np.zeros_like(t)


def fuse(probs: np.ndarray, window: np.ndarray, labels: tuple[str, ...] | list[str],
         weight: float = WINDOW_WEIGHT, sharpness: float = 1.0) -> np.ndarray:
    """The dual-head ``probs`` (over ``labels``) with the tumour types re-weighed by ``window`` (over
    ``TUMOUR_CLASSES``): the geometric mean of the two type distributions, ``weight`` the window's share,
    raised to ``sharpness`` (an inverse temperature) and scaled back to the dual-head network's tumour
    probability. The no-tumour probability is unchanged."""
    idx, mass, types = tumour_types(probs, labels)
    p = np.asarray(probs, np.float64).copy()
    if mass <= 0:
        return p.astype(np.float32)
    types = np.clip(types, 1e-8, 1.0)
    w = np.clip(np.asarray(window, np.float64), 1e-8, 1.0)
    z = sharpness * ((1 - weight) * np.log(types) + weight * np.log(w))
    g = np.exp(z - z.max())
    p[idx] = mass * g / g.sum()
    return p.astype(np.float32)


class TextOpinion(NamedTuple):
    """The aligned head's view of one slice: its unit text-space vector, logit scale, class prototypes [C, D]
    and the key of the descriptions they come from."""

    vector: np.ndarray
    scale: float
    prototypes: np.ndarray
    key: str | None


def product_text_vector(text: np.ndarray, text_scale: float, window: np.ndarray, weight: float) -> np.ndarray:
    """The unit text-space vector the fused tumour type is the nearest prototype of.

    Both opinions are inner products with the same prototypes (the aligned head's logits
    ``text_scale * cos(text, P)``, the window's ``window @ P`` with ``window`` its scaled vector,
    ``TextAnchoredWindowNet.scaled``), so ``fuse``'s weighted sum of their log-probabilities over the tumour
    types is, up to a constant per slice, the inner product of ``P`` with
    ``(1 - weight) * text_scale * text + weight * window``; sharpness only scales it."""
    v = (1 - weight) * text_scale * np.asarray(text, np.float64) + weight * np.asarray(window, np.float64)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


@dataclass
class WindowClassifier:
    net: TextAnchoredWindowNet
    crop: int = CROP
    scales: tuple[float, ...] = (1.0,)
    weight: float = WINDOW_WEIGHT
    sharpness: float = 1.0
    text_key: str | None = None  # which descriptions and encoder its prototypes come from
    meta: dict = field(default_factory=dict)
    device: str = "cpu"

    @property
    def prototypes(self) -> np.ndarray:
        return self.net.prototypes.float().cpu().numpy()

    @torch.no_grad()
    def look(self, arr: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(probabilities over ``TUMOUR_CLASSES``, scaled text-space vector) of the lesion ``mask`` marks on
        slice ``arr``; None when the mask is empty."""
        x = window_crop(arr, mask, self.crop, self.scales)
        if x is None:
            return None
        w = self.net.scaled(torch.from_numpy(x)[None].to(self.device))
        q = (w @ self.net.prototypes[self.net.types].T).softmax(1)
        return q[0].float().cpu().numpy(), w[0].float().cpu().numpy()

    def classify(self, arr: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        """Probabilities over ``TUMOUR_CLASSES`` of the lesion ``mask`` marks on slice ``arr``; None when
        the mask is empty."""
        seen = self.look(arr, mask)
        return None if seen is None else seen[0]

    def decide(self, probs: np.ndarray, arr: np.ndarray, mask: np.ndarray, labels: tuple[str, ...] | list[str],
               text: TextOpinion | None = None) -> tuple[np.ndarray, dict | None, np.ndarray | None]:
        """(fused probabilities, what the window said beside the network's own ``probs``, the fused decision's
        unit text-space vector) for a slice the dual-head network gave ``probs``; unchanged (and None, None)
        when there is no lesion to look at. Only for slices called a tumour. ``text``: the aligned head's view
        of this slice; the vector (``product_text_vector``) needs it, with the same descriptions as the
        window's (else None)."""
        seen = self.look(arr, mask)
        if seen is None:
            return probs, None, None
        q, u = seen
        fused = fuse(probs, q, labels, self.weight, self.sharpness)
        said = {"probabilities": {c: round(float(v), 4) for c, v in zip(TUMOUR_CLASSES, q, strict=True)},
                "network_probabilities": {c: round(float(v), 4) for c, v in zip(labels, probs, strict=True)},
                "weight": round(self.weight, 4), "sharpness": round(self.sharpness, 4),
                "changed_label": labels[int(np.argmax(fused))] != labels[int(np.argmax(probs))]}
        v = None
        if text is not None and text.key == self.text_key:
            v = product_text_vector(text.vector, text.scale, u, self.weight)
        return fused, said, v

    def save(self, path: str | Path) -> Path:
        return save_fp16(path, self.net, crop=self.crop, scales=list(self.scales), members=self.net.members,
                         weight=self.weight, sharpness=self.sharpness, text_key=self.text_key, meta=self.meta)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> WindowClassifier:
        def build(st: dict) -> TextAnchoredWindowNet:
            protos = st["state_dict"].get("prototypes")
            if protos is None:
                raise ValueError("stored before the window classifier was anchored to the class descriptions' "
                                 "prototypes: run `tumorlens train-window` again")
            return build_window_net(protos.float(), len(st.get("scales", (1.0,))), int(st.get("members", 1)))

        net, st = load_fp16(path, build, "lesion-window classifier")
        weight, sharpness = float(st.get("weight", WINDOW_WEIGHT)), float(st.get("sharpness", 1.0))
        if not (0.0 <= weight <= 1.0 and 0.0 < sharpness < 100.0):
            raise ModelNotFoundError(f"{path}: lesion-window classifier with an impossible fusion "
                                     f"(weight {weight}, sharpness {sharpness})")
        return cls(net=net.to(device), crop=int(st.get("crop", CROP)),
                   scales=tuple(float(v) for v in st.get("scales", (1.0,))),
                   weight=weight, sharpness=sharpness, text_key=st.get("text_key"),
                   meta=dict(st.get("meta") or {}), device=str(device))


def load_window_classifier(model_path: str | Path, device: str = "cpu") -> WindowClassifier | None:
    """The window classifier stored beside a model (cached per file and mtime), or None."""
    return load_beside(model_path, WINDOW_FILE, WindowClassifier.load, device)


def carry_window_classifier(src_folder: str | Path, dst_folder: str | Path) -> bool:
    """Copy a model's lesion-window classifier into a version fine-tuned with the encoder frozen; True when there
    was one to copy. It shares no weights with the dual-head network and reads the image's own lesion window, so it
    stays valid while the encoder is unchanged. Dropping it had cost every version trained in the MONAI Label app 4.5
    points of accuracy on 90 grouped-validation tumour slices (0.967 -> 0.922, an outside probe, session 40; the
    same version with it carried: 0.967)."""
    import shutil

    from tumorlens.atomic import atomic_write

    src = Path(src_folder) / WINDOW_FILE
    if not src.is_file():
        return False
    atomic_write(Path(dst_folder) / WINDOW_FILE, lambda tmp: shutil.copyfile(src, tmp))
    return True
