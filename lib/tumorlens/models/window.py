"""Lesion-window classifier: a second opinion on the tumour type from the lesion at the slice's own pixels.

Why: the dual-head network decides from the whole slice at 128 px, half the training slices' 256 px, and
most of its errors are one tumour type read as another (glioma as meningioma above all). Cheng et al.
(PLoS ONE 2015), who published these figshare slices, found the tumour region and its rim carry the type.
This small ResNet looks only at the window the lesion refiner uses (``tumorlens.models.refiner``: the
largest part of the product's mask plus a rim, sampled to 96 x 96 from the slice itself) and gives the
three tumour types' probabilities.

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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import ResNet

from tumorlens.errors import ModelNotFoundError
from tumorlens.labels import TUMOUR_CLASSES
from tumorlens.models.beside import load_beside, load_fp16, save_fp16
from tumorlens.models.refiner import CROP, crop_grid, lesion_box, lesion_window, normalise_crop, sample

WINDOW_FILE = "window_classifier.pt"
WIDTHS = (32, 64, 128, 256)  # a quarter of ResNet18's channels: 2.8 M weights, 5.6 MB in fp16
WINDOW_WEIGHT = 0.5  # share of the window's opinion in the geometric mean, for a file stored without a fitted fusion


def build_window_net(channels: int = 1) -> ResNet:
    return ResNet(block="basic", layers=(2, 2, 2, 2), block_inplanes=list(WIDTHS), spatial_dims=2,
                  n_input_channels=channels, num_classes=len(TUMOUR_CLASSES), conv1_t_stride=2)


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


@dataclass
class WindowClassifier:
    net: ResNet
    crop: int = CROP
    scales: tuple[float, ...] = (1.0,)
    weight: float = WINDOW_WEIGHT
    sharpness: float = 1.0
    meta: dict = field(default_factory=dict)
    device: str = "cpu"

    @torch.no_grad()
    def classify(self, arr: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        """Probabilities over ``TUMOUR_CLASSES`` of the lesion ``mask`` marks on slice ``arr``; None when
        the mask is empty."""
        x = window_crop(arr, mask, self.crop, self.scales)
        if x is None:
            return None
        return self.net(torch.from_numpy(x)[None].to(self.device)).softmax(1)[0].float().cpu().numpy()

    def decide(self, probs: np.ndarray, arr: np.ndarray, mask: np.ndarray,
               labels: tuple[str, ...] | list[str]) -> tuple[np.ndarray, dict | None]:
        """(fused probabilities, what the window said beside the network's own ``probs``) for a slice the
        dual-head network gave ``probs``; unchanged (and None) when there is no lesion to look at. Only for
        slices called a tumour."""
        q = self.classify(arr, mask)
        if q is None:
            return probs, None
        fused = fuse(probs, q, labels, self.weight, self.sharpness)
        return fused, {"probabilities": {c: round(float(v), 4) for c, v in zip(TUMOUR_CLASSES, q, strict=True)},
                       "network_probabilities": {c: round(float(v), 4) for c, v in zip(labels, probs, strict=True)},
                       "weight": round(self.weight, 4), "sharpness": round(self.sharpness, 4),
                       "changed_label": labels[int(np.argmax(fused))] != labels[int(np.argmax(probs))]}

    def save(self, path: str | Path) -> Path:
        return save_fp16(path, self.net, crop=self.crop, scales=list(self.scales), weight=self.weight,
                         sharpness=self.sharpness, meta=self.meta)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> WindowClassifier:
        net, st = load_fp16(path, lambda st: build_window_net(len(st.get("scales", (1.0,)))),
                            "lesion-window classifier")
        weight, sharpness = float(st.get("weight", WINDOW_WEIGHT)), float(st.get("sharpness", 1.0))
        if not (0.0 <= weight <= 1.0 and 0.0 < sharpness < 100.0):
            raise ModelNotFoundError(f"{path}: lesion-window classifier with an impossible fusion "
                                     f"(weight {weight}, sharpness {sharpness})")
        return cls(net=net.to(device), crop=int(st.get("crop", CROP)),
                   scales=tuple(float(v) for v in st.get("scales", (1.0,))),
                   weight=weight, sharpness=sharpness,
                   meta=dict(st.get("meta") or {}), device=str(device))


def load_window_classifier(model_path: str | Path, device: str = "cpu") -> WindowClassifier | None:
    """The window classifier stored beside a model (cached per file and mtime), or None."""
    return load_beside(model_path, WINDOW_FILE, WindowClassifier.load, device)
