"""One intensity normalisation for 8-bit JPEG slices and float NIfTI volumes alike.

MRI has no absolute intensity scale: JPEGs are 0-255 with a black background, the BraTS volumes
are z-scored (negative inside the brain, 0 outside). Robust percentiles of the *foreground* map
both to [0, 1] with background at 0, so one network serves both.
"""

from __future__ import annotations

import numpy as np
import torch

LOW_PCT, HIGH_PCT = 0.5, 99.5
VERSION = 3  # bump when the normalisation or framing (inference.head_frame) changes: cached training arrays are keyed on it


def background_value(x: np.ndarray) -> float:
    """What surrounds the head: the image border's median, unless one value fills much more of the image.

    Skull-stripped volumes have a constant background (BraTS z-scores: about -4.8, not 0) and a
    resampled or padded volume may carry a thin frame of another value (often 0) along its border.
    The border median would then take the frame for the background and the whole field of view for
    the head. So when a single value covers >= 20 % of the image and at least twice as much of it as
    the border median does and differs from it by over 10 % of the intensity range, that value
    is the background (JPEG noise around a black border, e.g. 3 vs 0, changes nothing).
    """
    if x.ndim == 2:
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    else:
        border = np.concatenate([x[0].ravel(), x[-1].ravel(), x[:, 0].ravel(), x[:, -1].ravel()])
    edge = float(np.median(border))
    step = max(1, int(round((x.size / 2_000_000) ** (1 / x.ndim))))  # a subsample is enough for shares
    sample = x[(slice(None, None, step),) * x.ndim].ravel()
    mode, top_count = most_common_value(sample)
    share = top_count / sample.size
    if share >= 0.2 and top_count >= 2 * np.count_nonzero(sample == edge):
        lo, hi = np.percentile(sample, [LOW_PCT, HIGH_PCT])
        if abs(mode - edge) > 0.1 * max(hi - lo, 1e-6):
            return mode
    return edge


def dark_border_fraction(x: np.ndarray, width: float = 0.03, level: float = 0.1) -> float:
    """Share of a 2D picture's outer frame (``width`` of its shorter side, at least 2 px) that is dark:
    within ``level`` of the robust intensity range (1st-99th percentile) above the darkest values, after a
    3 x 3 median filter (a noisy grey background is still air).

    An MRI slice shows a head in signal-free air, so its frame is mostly dark: every one of the 3,448
    development slices scored >= 0.53 (tight crops whose head touches the edges included; without the
    median filter one slice with a noisy background scored 0.23). Textures, documents and micrographs that
    fill the picture (the moon, grass, gravel, a printed page, text, cells) scored 0.00-0.12. A constant
    picture counts as all dark."""
    from scipy import ndimage

    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"dark_border_fraction expects a 2D picture, got shape {a.shape}")
    step = max(1, min(a.shape) // 512)  # a large photograph: every step-th pixel is enough
    a = ndimage.median_filter(a[::step, ::step], 3, mode="nearest")
    lo, hi = np.percentile(a, [1.0, 99.0])
    if hi - lo <= 1e-6 * max(abs(float(hi)), 1.0):
        return 1.0
    b = min(max(2, int(round(width * min(a.shape)))), max(1, min(a.shape) // 2))
    ring = np.concatenate([a[:b].ravel(), a[-b:].ravel(), a[b:-b, :b].ravel(), a[b:-b, -b:].ravel()])
    return float(np.mean(ring - lo < level * (hi - lo)))


def most_common_value(a: np.ndarray) -> tuple[float, int]:
    """The most frequent value of a 1D array (the smallest one on ties) and its count.

    Images stored as integers (JPEG, PNG, most DICOM and NIfTI) are counted with ``bincount`` in
    linear time; ``np.unique`` sorts, which was two thirds of ``foreground_mask``'s cost and ~13 %
    of a 2D classification request. Both paths give the same answer.
    """
    if a.size and np.issubdtype(a.dtype, np.number):
        lo, hi = a.min(), a.max()
        if np.isfinite(lo) and np.isfinite(hi) and hi - lo < 65536:
            shifted = a - lo
            as_int = shifted.astype(np.int64)
            if np.array_equal(as_int, shifted):
                counts = np.bincount(as_int)
                top = int(np.argmax(counts))
                return float(lo) + top, int(counts[top])
    values, counts = np.unique(a, return_counts=True)
    top = int(np.argmax(counts))
    return float(values[top]), int(counts[top])


def foreground_mask(x: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background by more than 2 % of the robust range."""
    bg = background_value(x)
    lo, hi = np.percentile(x, [LOW_PCT, HIGH_PCT])
    tol = 0.02 * max(hi - lo, 1e-6)
    return np.abs(x - bg) > tol


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of a binary mask (the mask itself when it has at most one part)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def normalize_intensity(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map the foreground's [0.5, 99.5] percentiles to [0, 1], clip, and set background to 0.

    Works on any spatial array (2D slice or 3D volume, optionally with a leading channel of 1).
    A constant image becomes all zeros.
    """
    is_tensor = isinstance(x, torch.Tensor)
    arr = x.detach().cpu().numpy() if is_tensor else np.asarray(x)
    squeeze = arr.ndim in (3, 4) and arr.shape[0] == 1
    a = arr[0] if squeeze else arr
    a = a.astype(np.float32, copy=False)
    fg = foreground_mask(a)
    if fg.sum() < 16:
        out = np.zeros_like(a)
    else:
        lo, hi = np.percentile(a[fg], [LOW_PCT, HIGH_PCT])
        if hi - lo < 1e-6:
            out = np.zeros_like(a)
        else:
            out = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
            out[~fg] = 0.0  # what surrounds the head is black, whatever its stored value
    out = out[None] if squeeze else out
    if is_tensor:
        t = torch.from_numpy(out)
        if hasattr(x, "affine"):
            from monai.data import MetaTensor

            return MetaTensor(t, meta=dict(x.meta))
        return t
    return out
