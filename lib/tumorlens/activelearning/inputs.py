"""Network inputs of one image: the 2D slice itself, or a few representative axial slices of a volume.

Scoring every slice of a volume would cost a full prediction per image; the slices with the most
brain (evenly spread over the foreground range) represent it at a fraction of the cost.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from tumorlens.data.normalize import normalize_intensity
from tumorlens.data.readers import is_volume
from tumorlens.errors import InvalidInputError
from tumorlens.inference import (
    display_foreground,
    framed_inputs,
    prepare_slice,
    volume_frame,
    volume_to_display,
)


def network_inputs(img: MetaTensor, size: int, max_slices: int = 8) -> torch.Tensor:
    """``[N, 1, size, size]`` normalised network inputs (N = 1 for a 2D image)."""
    arr = img.detach().cpu().numpy()[0]
    if not np.any(arr != arr.flat[0]):
        raise InvalidInputError(img.meta.get("filename_or_obj"), "image is constant (empty or all-zero)")
    if not is_volume(img):
        return prepare_slice(arr, size)
    # volumes (one-slice ones too) in the display orientation and frame ``Predictor.predict`` uses
    disp, _ = volume_to_display(arr, np.asarray(img.affine, dtype=float))
    if len(disp) == 1:
        return prepare_slice(disp[0], size)
    fg, brain = display_foreground(disp)
    area = fg.reshape(len(fg), -1).mean(1)
    use = np.where(area >= 0.25 * max(area.max(), 1e-9))[0]
    if use.size == 0:
        raise InvalidInputError(img.meta.get("filename_or_obj"), "volume has no brain-like foreground")
    pick = use[np.unique(np.linspace(0, use.size - 1, min(max_slices, use.size)).round().astype(int))]
    return framed_inputs(normalize_intensity(disp)[pick], volume_frame(fg[brain]), size)
