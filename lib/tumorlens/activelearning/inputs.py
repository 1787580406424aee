"""Network inputs of one image: the 2D slice itself, or a few representative axial slices of a volume.

Scoring every slice of a volume would cost a full prediction per image; the slices with the most
brain (evenly spread over the foreground range) represent it at a fraction of the cost.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from tumorlens.errors import InvalidInputError
from tumorlens.inference import slice_inputs


def network_inputs(img: MetaTensor, size: int, max_slices: int = 8) -> torch.Tensor:
    """``[N, 1, size, size]`` normalised network inputs (N = 1 for a 2D image): of a volume, up to
    ``max_slices`` brain slices spread evenly over those with the most foreground."""
    arr = img.detach().cpu().numpy()[0]
    if not np.any(arr != arr.flat[0]):
        raise InvalidInputError(img.meta.get("filename_or_obj"), "image is constant (empty or all-zero)")

    def spread(fg: np.ndarray, _brain: np.ndarray) -> np.ndarray:
        area = fg.reshape(len(fg), -1).mean(1)
        use = np.where(area >= 0.25 * max(area.max(), 1e-9))[0]
        return use[np.unique(np.linspace(0, use.size - 1, min(max_slices, use.size)).round().astype(int))] \
            if use.size else use

    return slice_inputs(img, size, spread)
