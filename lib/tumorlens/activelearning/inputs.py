"""Network inputs of one image: the 2D slice itself, or a few representative axial slices of a volume.

Scoring every slice of a volume would cost a full prediction per image; the slices with the most
brain (evenly spread over the foreground range) represent it at a fraction of the cost.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from tumorlens.data.normalize import foreground_mask, normalize_intensity
from tumorlens.data.readers import is_volume
from tumorlens.errors import InvalidInputError
from tumorlens.inference import prepare_slice, resize_2d, volume_to_display


def network_inputs(img: MetaTensor, size: int, max_slices: int = 8) -> torch.Tensor:
    """``[N, 1, size, size]`` normalised network inputs (N = 1 for a 2D image)."""
    arr = img.detach().cpu().numpy()[0]
    if not np.any(arr != arr.flat[0]):
        raise InvalidInputError(img.meta.get("filename_or_obj"), "image is constant (empty or all-zero)")
    if not is_volume(img) or arr.shape[-1] == 1:
        a2 = arr[..., 0] if is_volume(img) else arr
        return prepare_slice(a2, size)
    disp, _ = volume_to_display(arr, np.asarray(img.affine, dtype=float))
    area = np.array([foreground_mask(s).mean() for s in disp])
    use = np.where(area >= 0.25 * max(area.max(), 1e-9))[0]
    if use.size == 0:
        raise InvalidInputError(img.meta.get("filename_or_obj"), "volume has no brain-like foreground")
    pick = use[np.unique(np.linspace(0, use.size - 1, min(max_slices, use.size)).round().astype(int))]
    vnorm = normalize_intensity(disp)
    return resize_2d(torch.from_numpy(vnorm[pick].copy())[:, None], size)
