"""One intensity normalisation for 8-bit JPEG slices and float NIfTI volumes alike.

MRI has no absolute intensity scale: JPEGs are 0-255 with a black background, the BraTS volumes
are z-scored (negative inside the brain, 0 outside). Robust percentiles of the *foreground* map
both to [0, 1] with background at 0, so one network serves both.
"""

from __future__ import annotations

import numpy as np
import torch

LOW_PCT, HIGH_PCT = 0.5, 99.5


def background_value(x: np.ndarray) -> float:
    """The value of the image border (median), i.e. what surrounds the head."""
    if x.ndim == 2:
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    else:
        border = np.concatenate([x[0].ravel(), x[-1].ravel(), x[:, 0].ravel(), x[:, -1].ravel()])
    return float(np.median(border))


def foreground_mask(x: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background by more than 2 % of the robust range."""
    bg = background_value(x)
    lo, hi = np.percentile(x, [LOW_PCT, HIGH_PCT])
    tol = 0.02 * max(hi - lo, 1e-6)
    return np.abs(x - bg) > tol


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
