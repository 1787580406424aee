"""Lesion refiner: a small 2D U-Net that re-outlines the seg head's lesion in a crop of the slice at
the slice's own resolution.

Why: the dual-head network sees a slice at 128 px, half the 256 px of the training slices, so a
lesion's border is drawn on a grid twice as coarse as the outline it is scored against. On the
grouped validation part the seg head's mask misses 9 % of tumours outright (nothing to refine) and
reaches Dice 0.74 on the rest. A second network that looks only at a window around the lesion, at
native pixels, redraws that border. The window follows the lesion's size (``lesion_window``), so the
crop shows the lesion and a rim of its surroundings whatever the lesion's or the image's size.

The refiner replaces the seg head's probabilities inside the window around the largest connected
part of the coarse mask; outside it the seg head's map is kept. It never adds a lesion where the seg
head found none, and it is only stored next to a model when it raised seg Dice on that model's
grouped validation part (``tumorlens train-refiner``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from tumorlens.atomic import atomic_write
from tumorlens.data.normalize import largest_component
from tumorlens.models.beside import load_beside, load_fp16, save_fp16

REFINER_FILE = "refiner.pt"
CROP = 96  # crop side in network pixels
# a slice this small holds no detail beyond the seg head's own map: redrawn from a few native pixels
# blown up to the crop, a 24 px thumbnail's lesion grew to half the picture (the head's own: 23 px)
MIN_SIDE = 64
WINDOW_SCALE, WINDOW_RIM, WINDOW_MIN = 1.6, 24.0, 48.0  # window side = 1.6 x lesion side + 24 px, >= 48 px


def build_refiner_net() -> UNet:
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def lesion_window(side_px: float) -> float:
    """Side (pixels of the slice) of the square window around a lesion whose bounding box side is
    ``side_px``: the lesion plus a rim that gives the network its surroundings to compare with."""
    return float(max(WINDOW_SCALE * side_px + WINDOW_RIM, WINDOW_MIN))


def lesion_box(mask: np.ndarray) -> tuple[float, float, float] | None:
    """(centre row, centre col, side) of the bounding square of the largest connected part of ``mask``."""
    if not mask.any():
        return None
    part = largest_component(mask)
    rows, cols = np.where(part.any(1))[0], np.where(part.any(0))[0]
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    return (rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2, float(side)


def crop_grid(shape: tuple[int, int], cy: float, cx: float, w: float, out: int = CROP, angle: float = 0.0,
              flip: bool = False) -> torch.Tensor:
    """``grid_sample`` grid [1, out, out, 2] of a ``w`` x ``w`` window centred at (cy, cx) in pixel
    indices of an image of ``shape``, optionally rotated by ``angle`` (radians) and mirrored."""
    o = (np.arange(out) + 0.5) / out * w - w / 2
    dy, dx = np.meshgrid(o, o, indexing="ij")
    if flip:
        dx = -dx
    ca, sa = np.cos(angle), np.sin(angle)
    py, px = cy + ca * dy - sa * dx, cx + sa * dy + ca * dx
    h, wd = shape
    g = np.stack([(2 * px + 1) / wd - 1, (2 * py + 1) / h - 1], -1)[None]
    return torch.from_numpy(g).float()


def sample(a: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """``a`` [H, W] sampled bilinearly on ``grid`` (zero outside the image)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.grid_sample(t, grid, mode="bilinear", align_corners=False)[0, 0].numpy()


def normalise_crop(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit spread, whatever the intensity scale: in float64 (float32 overflowed on a slice
    stored at 1e20 and emptied the mask), with the small guard against flat crops scaled to the crop's
    range (1e-3 on the 0-255 training slices)."""
    x = np.asarray(x, dtype=np.float64)
    guard = 1e-3 * max(float(np.abs(x).max(initial=0.0)) / 255.0, 1e-300)
    return ((x - x.mean()) / (x.std() + guard)).astype(np.float32)


def paste(p: np.ndarray, shape: tuple[int, int], cy: float, cx: float, w: float) -> tuple[np.ndarray, np.ndarray]:
    """A crop's map ``p`` [out, out] (unrotated window) back on the image grid: (map, inside-window mask).
    Only the window's rows and columns are sampled (volumes call this once per lesion slice)."""
    out = p.shape[0]
    full, inside = np.zeros(shape, np.float32), np.zeros(shape, bool)
    y0, y1 = max(0, int(np.ceil(cy - w / 2))), min(shape[0], int(np.floor(cy + w / 2)) + 1)
    x0, x1 = max(0, int(np.ceil(cx - w / 2))), min(shape[1], int(np.floor(cx + w / 2)) + 1)
    if y0 >= y1 or x0 >= x1:
        return full, inside
    a = (np.arange(y0, y1) - cy + w / 2) / (w / out) - 0.5  # crop-pixel coordinates of the rows
    b = (np.arange(x0, x1) - cx + w / 2) / (w / out) - 0.5
    ok_a, ok_b = (a >= -0.5) & (a <= out - 0.5), (b >= -0.5) & (b <= out - 0.5)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    g = torch.from_numpy(np.stack([(2 * bb + 1) / out - 1, (2 * aa + 1) / out - 1], -1)[None]).float()
    t = torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32))[None, None]
    full[y0:y1, x0:x1] = F.grid_sample(t, g, mode="bilinear", align_corners=False)[0, 0].numpy()
    inside[y0:y1, x0:x1] = ok_a[:, None] & ok_b[None, :]
    return full * inside, inside


@dataclass
class LesionRefiner:
    net: UNet
    crop: int = CROP
    meta: dict = field(default_factory=dict)
    device: str = "cpu"

    @torch.no_grad()
    def refine(self, arr: np.ndarray, prob: np.ndarray, coarse: np.ndarray) -> np.ndarray:
        """The slice's lesion probability: ``prob`` (the seg head's map on the slice grid) with the
        window around the largest part of ``coarse`` (its binary mask) redrawn at native resolution.
        Unchanged when ``coarse`` is empty."""
        box = lesion_box(coarse)
        if box is None or min(arr.shape) < MIN_SIDE:
            return prob
        cy, cx, side = box
        w = lesion_window(side)
        x = normalise_crop(sample(arr.astype(np.float32), crop_grid(arr.shape, cy, cx, w, self.crop)))
        p = self.net(torch.from_numpy(x)[None, None].to(self.device)).sigmoid()[0, 0].float().cpu().numpy()
        fine, inside = paste(p, arr.shape, cy, cx, w)
        return np.where(inside, fine, prob).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        return save_fp16(path, self.net, crop=self.crop, meta=self.meta)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> LesionRefiner:
        net, st = load_fp16(path, lambda st: build_refiner_net(), "lesion refiner")
        return cls(net=net.to(device), crop=int(st.get("crop", CROP)), meta=dict(st.get("meta") or {}),
                   device=str(device))


def load_refiner(model_path: str | Path, device: str = "cpu") -> LesionRefiner | None:
    """The refiner stored beside a model (cached per file and mtime), or None."""
    return load_beside(model_path, REFINER_FILE, LesionRefiner.load, device)


def carry_refiner(src_folder: str | Path, dst_folder: str | Path) -> bool:
    """Copy a model's refiner into a fine-tuned version's folder; True when there was one to copy.

    The refiner redraws whatever lesion the seg head hands it and shares no weights with the dual-head
    network, so a version fine-tuned from the model keeps it (its validation figures in ``meta`` stay
    those measured with the base model)."""
    src = Path(src_folder) / REFINER_FILE
    if not src.is_file():
        return False
    atomic_write(Path(dst_folder) / REFINER_FILE, lambda tmp: shutil.copyfile(src, tmp))
    return True
