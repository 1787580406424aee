"""Saliency map -> binary lesion mask with a per-image adaptive percentile.

The rule (and why). A fixed percentile (say 95 %) assumes every lesion covers 5 % of the brain;
tumours here cover from < 1 % to > 20 %. The map itself says how spread out its evidence is: with
``p = map / sum(map)`` over brain pixels, ``exp(H(p))`` is the map's *effective support* (the
perplexity: for a map that is flat on a region and zero elsewhere it is exactly that region's
pixel count), computed on the map minus its brain median (the floor of a smooth, upsampled CAM
is not evidence). The mask keeps the top ``scale x effective support`` pixels:

    percentile = clip(100 * (1 - scale * exp(H) / N_brain), P_MIN, P_MAX)

``scale = 0.5`` keeps the core of a smooth blob (a Gaussian bump is cut near 40 % of its peak
rather than in its faint tails). A peaked map -> small support -> high percentile -> small mask;
a diffuse map -> lower percentile -> larger mask. The rule uses the saliency map only, not the
segmentation head, so that the saliency masks stay an independent explanation that can be
compared with the segmentation head.

Clean-up: 8-/26-connected components; keep the one holding the map's maximum and any other whose
peak is at least ``keep_peak`` of the maximum and whose size is at least ``min_keep`` of the main
one (a second focus, not speckle); fill holes; restrict to the brain (the foreground of
``tumorlens.data.normalize.foreground_mask`` with its holes filled, so dark ventricles count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tumorlens.data.normalize import foreground_mask
from tumorlens.errors import InvalidInputError

P_MIN, P_MAX = 80.0, 99.5
SCALE = 0.5
RULE = ("percentile = clip(100*(1 - 0.5*exp(H)/N_brain), 80, 99.5), H = entropy of the map above its "
        "brain median")


@dataclass
class Threshold:
    mask: np.ndarray  # bool, same shape as the map
    percentile: float
    threshold: float
    effective_fraction: float  # exp(H) / N_brain
    rule: str = RULE


def brain_mask(image: np.ndarray) -> np.ndarray:
    """The head: foreground of the image, opened to drop background noise, its large connected
    parts, holes filled (dark ventricles and the lesion itself count as brain). 2D or 3D."""
    fg = foreground_mask(np.asarray(image, dtype=np.float32))
    if not fg.any():
        return fg
    radius = max(2, int(round(min(fg.shape[:2]) / 128)))  # noise specks in 512 px JPEG backgrounds
    opened = ndimage.binary_opening(fg, structure=ndimage.generate_binary_structure(fg.ndim, 1), iterations=radius)
    labels, n = ndimage.label(opened if opened.any() else fg)
    if n > 1:  # keep the head's parts (>= 10 % of the largest); drop specks of background noise
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        keep = np.concatenate([[False], sizes >= 0.1 * sizes.max()])
        head = keep[labels]
    else:
        head = labels > 0
    return ndimage.binary_fill_holes(head)


def effective_fraction(heat: np.ndarray, brain: np.ndarray) -> float:
    """exp(entropy) of the map's part above its brain median, as a fraction of the brain's size.

    The median is the map's floor (upsampled coarse CAMs are rarely 0 anywhere in the brain);
    counting the floor as evidence would call every map diffuse."""
    v = heat[brain].astype(np.float64)
    v = np.clip(v - np.median(v), 0, None) if v.size else v
    n = v.size
    total = v.sum()
    if n == 0 or total <= 0:
        return 1.0
    p = v[v > 0] / total
    h = float(-(p * np.log(p)).sum())
    return float(min(1.0, np.exp(h) / n))


def adaptive_percentile(heat: np.ndarray, brain: np.ndarray, scale: float = SCALE) -> tuple[float, float]:
    """(percentile, effective fraction) for one map; see the module docstring."""
    frac = effective_fraction(heat, brain)
    return float(np.clip(100.0 * (1.0 - scale * frac), P_MIN, P_MAX)), frac


def adaptive_mask(heat: np.ndarray, brain: np.ndarray | None = None, *, image: np.ndarray | None = None,
                  scale: float = SCALE, keep_peak: float = 0.6, min_keep: float = 0.1) -> Threshold:
    """Binary mask of one saliency map (2D or 3D array; a leading channel of 1, as ``saliency_maps`` gives its
    maps, is dropped when ``brain`` or ``image`` has one axis fewer)."""
    heat = np.asarray(heat, dtype=np.float32)
    ref = brain if brain is not None else image
    if ref is not None and heat.ndim == np.ndim(ref) + 1 and heat.shape[0] == 1:
        heat = heat[0]
    if not np.isfinite(heat).all():
        raise InvalidInputError(None, f"saliency map contains {int((~np.isfinite(heat)).sum())} non-finite values")
    if brain is None:
        brain = brain_mask(image) if image is not None else np.ones(heat.shape, bool)
    brain = np.asarray(brain, bool)
    if brain.shape != heat.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from the map's {heat.shape}")
    inside = np.where(brain, heat, 0.0)
    if not brain.any() or inside.max() <= 0:
        return Threshold(np.zeros(heat.shape, bool), P_MAX, float("inf"), 1.0)
    pct, frac = adaptive_percentile(inside, brain, scale)
    thr = float(np.percentile(inside[brain], pct))
    thr = max(thr, 1e-6 * float(inside.max()))
    binary = (inside >= thr) & brain
    binary = _clean(binary, inside, keep_peak, min_keep) & brain
    return Threshold(binary, pct, thr, frac)


def _clean(binary: np.ndarray, heat: np.ndarray, keep_peak: float, min_keep: float) -> np.ndarray:
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)  # 8- / 26-connected
    labels, n = ndimage.label(binary, structure=structure)
    if n == 0:
        return binary
    peak_pos = np.unravel_index(int(np.argmax(np.where(binary, heat, -np.inf))), heat.shape)
    main = labels[peak_pos]
    sizes = ndimage.sum_labels(binary, labels, index=np.arange(1, n + 1))
    peaks = ndimage.maximum(heat, labels, index=np.arange(1, n + 1))
    gmax = float(heat.max())
    keep = np.zeros(n + 1, bool)
    keep[main] = True
    for i in range(1, n + 1):
        if peaks[i - 1] >= keep_peak * gmax and sizes[i - 1] >= min_keep * sizes[main - 1]:
            keep[i] = True
    return ndimage.binary_fill_holes(keep[labels])
