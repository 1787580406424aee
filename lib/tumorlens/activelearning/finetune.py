"""Fine-tune the current dual-head model on a datastore's labelled images (the relabel loop's
"train" step), reusing the training package's dataset, augmentations, optimisers and losses.

Labelled items are 2D images (one sample each) or volumes (axial slices: those the label mask
touches carry the volume's class, a few brain slices it does not touch are tumour-free).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss
from torch.utils.data import DataLoader
from tqdm import tqdm

from tumorlens.data.dataset import ArrayDataset, train_transforms
from tumorlens.data.normalize import foreground_mask, normalize_intensity
from tumorlens.data.readers import is_volume, read_image, reorient_like, same_grid
from tumorlens.errors import InvalidInputError, TrainingDivergedError
from tumorlens.inference import (
    display_foreground,
    framed_inputs,
    prepare_mask,
    prepare_slice,
    volume_frame,
    volume_to_display,
)
from tumorlens.labels import CLASS_NAMES, NO_TUMOUR, class_index
from tumorlens.models.registry import LoadedModel
from tumorlens.training.train import make_optimizer, validate


def _read_nrrd_label(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """NRRD labels (3D Slicer's format; ``.seg.nrrd`` layers merged): ``[X, Y, Z]`` > 0 and the RAS affine."""
    import SimpleITK as sitk

    from tumorlens.data.readers import LPS_TO_RAS

    try:
        im = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InvalidInputError(path, f"not a readable NRRD label: {str(e).strip().splitlines()[-1]}") from e
    arr = sitk.GetArrayFromImage(im)  # (z, y, x[, components])
    if im.GetNumberOfComponentsPerPixel() > 1:
        arr = arr.any(-1)
    if arr.ndim == 2:
        arr = arr[None]
    dim = im.GetDimension()
    lps = np.eye(4)
    lps[:dim, :dim] = np.asarray(im.GetDirection()).reshape(dim, dim) * np.asarray(im.GetSpacing())[None, :]
    lps[:dim, 3] = im.GetOrigin()
    return np.transpose(arr, (2, 1, 0)) > 0, LPS_TO_RAS @ lps


def read_label_like(path: str | Path, img) -> np.ndarray:
    """A label file as a binary array on the image's own grid (2D: rows x cols; volume: X, Y, Z).

    A label that carries geometry (any affine but the identity, e.g. one 3D Slicer saved) is turned
    into the image's axis order and directions first (by the two affines' orientations): Slicer
    stores a JPEG's label as column x row, which would otherwise be read transposed - silently so
    for a square image. A label without geometry is taken in the image's own voxel order. A volume's label
    with geometry must then lie on the volume's grid (same spacing, origin and obliquity): one of the right
    shape placed elsewhere would be shown there by Slicer and trained here on other voxels, so it is refused.
    """
    if str(path).lower().endswith(".nrrd"):
        arr, aff = _read_nrrd_label(path)
    else:
        _one_value_per_pixel(path)
        lab = read_image(path)
        values = lab.detach().cpu().numpy()[0]
        check_label_values(path, values)
        arr, aff = values > 0, np.asarray(lab.affine, dtype=float)
    want = tuple(img.shape[1:])
    img_aff = np.asarray(img.affine, dtype=float)
    if arr.ndim == 2:
        arr = arr[..., None]
    placed = not np.allclose(aff, np.eye(4))
    if placed and not np.allclose(aff[:3, :3], img_aff[:3, :3], atol=1e-3):
        arr, aff = reorient_like(arr, aff, img_aff)
    if arr.shape != want and arr.ndim == 3 and arr.shape[-1] == 1 and arr.shape[:2] == want:
        arr = arr[..., 0]  # a 2D image's label stored as a one-slice volume
    if arr.shape != want:
        raise InvalidInputError(path, f"label shape {arr.shape} does not match image shape {want}")
    if placed and is_volume(img) and not same_grid(aff, img_aff):
        got, exp = np.sqrt((aff[:3, :3] ** 2).sum(0)), np.sqrt((img_aff[:3, :3] ** 2).sum(0))
        raise InvalidInputError(
            path, f"label grid (spacing {np.round(got, 3).tolist()} mm, origin {np.round(aff[:3, 3], 2).tolist()}) "
                  f"does not lie on the image's (spacing {np.round(exp, 3).tolist()} mm, origin "
                  f"{np.round(img_aff[:3, 3], 2).tolist()}): resample the label onto the image first")
    return arr.astype(np.uint8)


def _one_value_per_pixel(path: str | Path) -> None:
    """A label picture stores one value per pixel: an RGB PNG of the right size was stored as it came and served
    back in colour to every client (an outside probe, session 39), while the reader saw its grey version."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
    except (UnidentifiedImageError, OSError):
        return  # not a picture: its own reader says what it is
    if mode in ("RGB", "RGBA", "CMYK", "LA", "YCbCr", "LAB", "HSV"):
        raise InvalidInputError(path, f"a label picture holds one value per pixel; this one stores {mode} colour: "
                                      "save it as a grey (8-bit) or indexed PNG")


MAX_LABEL_VALUES = 128  # more than every region of the Harvard-Oxford atlas with its side (about 110)


def check_label_values(path, values: np.ndarray) -> None:
    """A label map holds a few integer values; a picture (a JPEG saved as a label by mistake: 244 grey levels)
    would train every non-black pixel as tumour, so it is refused."""
    distinct = np.unique(values)
    whole = bool(np.allclose(distinct, np.round(distinct)))
    if distinct.size > MAX_LABEL_VALUES or not whole:
        raise InvalidInputError(path, f"{distinct.size} distinct values{'' if whole else ', not whole numbers'}: a label "
                                      "map holds a few whole-number values (is this a picture, not a label?)")


def check_label_class(mask: np.ndarray, class_name: str, where, volume: bool) -> None:
    """A label's outline must agree with its class: ``no_tumor`` with a tumour drawn is a contradiction,
    and a tumour volume without an outline does not say which slices hold it. (A 2D tumour image with
    an empty mask is a class given without an outline: it trains the classifier only.)"""
    drawn = int(np.count_nonzero(mask))
    if class_name == NO_TUMOUR and drawn:
        raise InvalidInputError(where, f"class {NO_TUMOUR} but the mask outlines {drawn} voxels: give the tumour's "
                                "class, or save an empty mask")
    if volume and class_name != NO_TUMOUR and not drawn:
        raise InvalidInputError(where, f"a {class_name} volume needs its tumour outlined: with an empty mask the "
                                "slices that hold it are unknown")


UNKNOWN_CLASS = -1  # a tumour outlined without its type: trains the seg head, not the classifier
LESION_SLICE_SHARE = 0.1  # a volume's lesion slice holds at least this share of its largest slice's lesion area


def item_arrays(image: str | Path, label: str | Path | None, class_name: str | None, size: int,
                max_clear_slices: int = 4, max_lesion_slices: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S], masks uint8 [N, S, S], labels [N]) of one labelled item. ``class_name`` None:
    a mask saved without a class (3D Slicer's "tumor" segment): its lesion slices get ``UNKNOWN_CLASS``."""
    if class_name is not None and class_name not in CLASS_NAMES:
        raise InvalidInputError(label or image, f"unknown class {class_name!r}: one of {', '.join(CLASS_NAMES)}")
    img = read_image(image)
    mask = read_label_like(label, img) if label else np.zeros(img.shape[1:], np.uint8)
    if class_name is None:
        if not mask.any():
            raise InvalidInputError(label or image, "no class and an empty mask: nothing to learn from")
    else:
        check_label_class(mask, class_name, label or image, is_volume(img))
    lesion_class = UNKNOWN_CLASS if class_name is None else class_index(class_name)
    arr = img.detach().cpu().numpy()[0]
    if not is_volume(img):
        x = prepare_slice(arr, size)[0, 0].numpy()
        m = prepare_mask(mask, arr, size)
        return (np.round(x * 255).astype(np.uint8)[None], m.astype(np.uint8)[None], np.array([lesion_class]))
    disp, _ = volume_to_display(arr, np.asarray(img.affine, dtype=float))
    mdisp, _ = volume_to_display(mask, np.asarray(img.affine, dtype=float))
    area = np.array([foreground_mask(s).mean() for s in disp])
    brain = area >= 0.25 * max(area.max(), 1e-9)
    lesion_area = mdisp.reshape(len(mdisp), -1).sum(1)
    # the lesion's slices, less its first and last specks: a few voxels vanish at the network's size, and the slice
    # trained the class with an empty mask (an outside probe, session 39: "1 tumour image(s) without an outline" for
    # a volume outlined over 74 slices)
    touched = np.where(lesion_area >= max(1.0, LESION_SLICE_SHARE * lesion_area.max()))[0]
    clear = np.where(brain & (lesion_area == 0))[0]
    if touched.size > max_lesion_slices:
        touched = touched[np.linspace(0, touched.size - 1, max_lesion_slices).round().astype(int)]
    if clear.size:
        clear = clear[np.linspace(0, clear.size - 1, min(max_clear_slices, clear.size)).round().astype(int)]
    idx = np.concatenate([touched, clear]).astype(int)
    if idx.size == 0:
        raise InvalidInputError(image, "volume has no usable slices for training")
    vnorm = normalize_intensity(disp)
    fg, brain_slices = display_foreground(disp)
    frame = volume_frame(fg[brain_slices])  # the frame Predictor.predict sees this volume through
    x = framed_inputs(vnorm[idx], frame, size)[:, 0].numpy()
    m = framed_inputs(mdisp[idx].astype(np.float32), frame, size)[:, 0].numpy() >= 0.5
    y = np.array([lesion_class] * touched.size + [class_index(NO_TUMOUR)] * (idx.size - touched.size))
    # a lesion slice whose outline vanished at this size would teach the class from no visible tumour
    keep = (np.arange(idx.size) >= touched.size) | m.reshape(idx.size, -1).any(1)
    return np.round(np.clip(x[keep], 0, 1) * 255).astype(np.uint8), m[keep].astype(np.uint8), y[keep]


class _Indexed(torch.utils.data.Dataset):
    """An item and its position (which items' masks count)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return (*self.ds[i], i)


TRAINABLE = ("heads", "all")  # what a fine-tune may change: classifier + seg decoder, or the encoder too


def finetune(model: LoadedModel, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, *, epochs: int = 1,
             lr: float = 1e-4, batch_size: int = 8, seg_weight: float = 1.0, seed: int = 0,
             progress: bool = True, on_epoch: Callable[[dict], None] | None = None,
             val: Sequence[np.ndarray] | None = None, trainable: str = "heads",
             has_mask: np.ndarray | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Continue training a copy of ``model.net``; the loaded (serving) model is left untouched.

    ``trainable="heads"`` (the default) keeps the encoder frozen: its pooled features, which the text
    head and the familiarity check were fitted on, stay valid (``carried_heads``). ``"all"`` trains the
    encoder too. ``has_mask`` (bool [N]) marks items whose mask was drawn; the others (a class given
    without an outline) train the classifier only. A loss or weight that is not finite raises
    ``TrainingDivergedError`` (nothing half-trained is returned)."""
    import copy

    if trainable not in TRAINABLE:
        raise InvalidInputError(None, f"trainable must be one of {', '.join(TRAINABLE)}, not {trainable!r}")
    torch.manual_seed(seed)
    net = copy.deepcopy(model.net).float().train()
    if trainable == "heads":
        for p in net.encoder.parameters():
            p.requires_grad_(False)
    keep = np.ones(len(labels), bool) if has_mask is None else np.asarray(has_mask, bool)
    if keep.shape != (len(labels),):
        raise InvalidInputError(None, f"has_mask must hold one flag per item ({len(labels)}), got {keep.shape}")
    ds = _Indexed(ArrayDataset(images, masks, labels, train_transforms()))
    loader = DataLoader(ds, batch_size=min(batch_size, len(ds)), shuffle=True, num_workers=0, drop_last=False)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    dice = DiceLoss(sigmoid=True, batch=True)
    bce = torch.nn.BCEWithLogitsLoss()
    opt = make_optimizer("adamw", [p for p in net.parameters() if p.requires_grad], lr, 1e-4)
    history = []
    for epoch in range(epochs):
        net.train()
        # batch-norm statistics of a large pretraining set should not be overwritten by a handful of images
        for mod in net.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()
        t0 = time.time()
        losses = []
        for x, m, y, i in tqdm(loader, desc=f"fine-tune epoch {epoch + 1}/{epochs}", disable=not progress,
                               leave=False):
            logits, seg = net(x)
            known = y != UNKNOWN_CLASS  # masks saved without a class train the seg head only
            # (no term at all without a known class: a zero one would still let AdamW's decay move the classifier)
            loss = ce(logits[known], y[known]) if known.any() else torch.zeros((), dtype=seg.dtype)
            drawn = torch.as_tensor(keep[i.numpy()])
            if drawn.any():
                loss = loss + seg_weight * (dice(seg[drawn], m[drawn]) + bce(seg[drawn], m[drawn]))
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"the fine-tune diverged in epoch {epoch + 1} (loss {float(loss)} at "
                                            f"lr {lr:g}): nothing was published; try a smaller lr")
            if not loss.requires_grad:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingDivergedError(f"the fine-tune diverged in epoch {epoch + 1}: {len(bad)} weight tensors "
                                        f"are not finite (first {bad[0]}) at lr {lr:g}; nothing was published")
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - t0, 2),
               "samples": len(ds)}
        if val is not None and len(val[0]):
            vm = validate(net, *val, torch.device("cpu"))
            rec.update(val_accuracy=vm["accuracy"], val_seg_dice=vm["seg_dice"])
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
    return net.eval(), history
