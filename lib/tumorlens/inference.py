"""Run a dual-head model on one image: 2D slices directly, volumes slice-wise over axial slices (a
single coronal or sagittal slice as one picture in its own plane).

Outputs always come back on the input's own grid and affine, so a mask lands where the image is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from torch.nn import functional as F

from tumorlens.alignment.familiarity import Familiarity
from tumorlens.alignment.familiarity import assess as assess_familiarity
from tumorlens.alignment.layer_statistics import load_layer_statistics, pooled_stages
from tumorlens.caveats import (
    body_part_note,
    colour_note,
    dark_border_note,
    familiarity_note,
    slice_width_note,
)
from tumorlens.data.normalize import dark_border_fraction, foreground_mask, normalize_intensity
from tumorlens.data.readers import IMAGE_META_KEYS, image_array, is_volume
from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES, NO_TUMOUR
from tumorlens.models.refiner import load_refiner
from tumorlens.models.registry import LoadedModel, load_model
from tumorlens.models.window import TextOpinion, load_window_classifier

log = logging.getLogger(__name__)
SEG_THRESHOLD = 0.5
FALLBACK_FRACTION = 0.5  # of the map's peak: the region shown when the classifier finds a tumour the head missed
# Measured (README, "3D volumes with the 2D network"): slice by slice, the 2D network calls about as many
# slices of a healthy skull-stripped brain (nilearn's MNI152 template: 29 %) tumour as of a BraTS glioma
# volume (31 %), so a volume's class is not evidence of a tumour. Every volume prediction says so.
VOLUME_CAVEAT = ("volume classified slice by slice by a network trained on 2D slices: on skull-stripped volumes it "
                 "does not separate tumour from healthy brains (a healthy template scores like a glioma); treat the "
                 "class and the mask as unconfirmed")
# A volume stored on an oblique grid (axials angled along the AC-PC or orbitomeatal line, 5-20 degrees in routine
# practice) is cut by the 2D network along its stored slices: an outside probe's BraTS glioma tilted 5, 10 and 18
# degrees about the left-right axis came back a meningioma (p 0.81-0.90) with the mask twice as large, while half
# a voxel's shift did not change it. Not resampled (the masks stay on the stored grid Slicer shows): said.
TILT_CAVEAT_DEGREES = 3.0
TILT_CAVEAT = ("the volume's slices are tilted {deg:.0f} degrees from the nearest standard plane: the 2D network reads "
               "them as stored, and its class and mask changed with tilt in tests (a glioma tilted 5 degrees was read "
               "as a meningioma), so treat them as unconfirmed")
TURN_CAVEAT = ("the volume's slices are turned {deg:.0f} degrees within their plane from the patient's axes: the 2D "
               "network reads them as stored, turned, so treat its class and mask as unconfirmed")


def _axis_angles(affine) -> np.ndarray | None:
    a = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    if np.any(norms <= 0):
        return None
    return a / norms


def grid_tilt_degrees(affine) -> float:
    """How far the slice plane the 2D network reads (the voxel axes other than the one nearest the head's long
    axis) is tilted from the nearest standard plane: the angle between its normal and the world axis nearest it.
    A turn within the plane is not a tilt (``grid_turn_degrees``): a 10 degree tilt with a 20 degree turn had been
    called "tilted 22 degrees" (an outside probe, session 39)."""
    u = _axis_angles(affine)
    if u is None:
        return 0.0
    k = int(np.argmax(np.abs(u[2])))  # the slice axis: the voxel axis nearest superior-inferior
    i, j = [c for c in range(3) if c != k]
    n = np.cross(u[:, i], u[:, j])
    n /= max(np.linalg.norm(n), 1e-12)
    return float(np.degrees(np.arccos(np.clip(np.abs(n).max(), -1.0, 1.0))))


def grid_turn_degrees(affine) -> float:
    """How far the slice's in-plane axes are turned within their plane: once the plane is tilted back onto the
    nearest standard plane (the smallest rotation taking its normal onto the nearest world axis), the angle between
    an in-plane axis and the world axis nearest it."""
    u = _axis_angles(affine)
    if u is None:
        return 0.0
    k = int(np.argmax(np.abs(u[2])))
    i, j = [c for c in range(3) if c != k]
    n = np.cross(u[:, i], u[:, j])
    n /= max(np.linalg.norm(n), 1e-12)
    e = np.zeros(3)
    e[int(np.argmax(np.abs(n)))] = np.sign(n[int(np.argmax(np.abs(n)))])
    v, c = np.cross(n, e), float(np.dot(n, e))
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    rot = np.eye(3) + vx + vx @ vx / (1.0 + c) if c > -1.0 + 1e-9 else -np.eye(3)  # Rodrigues: n -> e
    back = rot @ u[:, i]
    return float(np.degrees(np.arccos(np.clip(np.abs(back).max(), -1.0, 1.0))))


# DICOM Modality values of pictures that may be MRI (secondary captures of MR slices are "OT"/"SC")
MRI_MODALITIES = frozenset({"MR", "OT", "SC", ""})
NOT_MRI_CAVEAT = "the file's modality is {modality}, not MR: the model was trained on MRI only, so its class and mask mean little here"


GUESSED_CT_CAVEAT = ("the file keeps no modality, but its intensities are CT's Hounsfield units (air at -1000), not MR: "
                     "the model was trained on MRI only, so its class and mask mean little here")


def modality_caveat(modality: str | None, guessed: bool = False) -> str | None:
    """A caveat when the file says it is not MRI (a CT slice is still given one of the four classes), or, for a
    format without a modality (NIfTI, NRRD), when its intensities say so (``guessed``)."""
    m = (modality or "").strip().upper()
    if m in MRI_MODALITIES:
        return None
    return GUESSED_CT_CAVEAT if guessed and m == "CT" else NOT_MRI_CAVEAT.format(modality=m)


def slice_width_mm(plane: np.ndarray, meta: dict) -> float | None:
    """The largest extent, in mm, of a 2D slice's foreground (its largest component, holes filled); None when the
    pixel spacing is unknown (a picture)."""
    from scipy import ndimage as ndi

    from tumorlens.data.normalize import largest_component

    if not meta.get("spacing_known") or meta.get("spacing") is None:
        return None
    fg = foreground_mask(np.asarray(plane, dtype=np.float32))
    if not fg.any():
        return None
    fg = largest_component(ndi.binary_fill_holes(fg))
    rows, cols = np.where(fg.any(1))[0], np.where(fg.any(0))[0]
    spacing = np.asarray(meta["spacing"], dtype=float).ravel()[:2]
    extents = [(rows[-1] - rows[0] + 1) * spacing[0], (cols[-1] - cols[0] + 1) * spacing[1]]
    spans = [(rows[0], rows[-1], fg.shape[0]), (cols[0], cols[-1], fg.shape[1])]
    widest = int(np.argmax(extents))
    lo, hi, n = spans[widest]
    if lo == 0 and hi == n - 1:
        return None  # the foreground fills the frame (a tight field of view, a noisy background): its width is the frame's
    return float(extents[widest])


def image_caveats(img: MetaTensor) -> list[str]:
    """The caveats an image gets for what it is, whatever the model answers: another modality or body part, a 2D
    slice wider than a head, colour, a frame that is not dark. ``predict`` gives them, and the active-learning
    strategies hand such images out last."""
    meta = getattr(img, "meta", {}) or {}
    plane = np.squeeze(img.detach().cpu().numpy()[0])
    flat = plane.ndim == 2
    found = [modality_caveat(meta.get("modality"), meta.get("modality_from") == "intensities"),
             body_part_note(meta.get("body_part")), slice_width_note(slice_width_mm(plane, meta) if flat else None),
             colour_note(meta.get("colour_fraction")), dark_border_note(dark_border_fraction(plane) if flat else None)]
    return [c for c in found if c]


def tumour_mask(seg_prob: np.ndarray, tumour_called: bool) -> np.ndarray:
    """Binary tumour mask (bool) from the seg head's probability map, 2D or 3D.

    The map is cut at ``SEG_THRESHOLD``. When the classifier calls a tumour but no pixel reaches the
    threshold, the head's most likely region (probability >= half its peak) is returned instead of an
    empty mask: an empty mask under a tumour label would leave the viewer, the atlas regions and the
    report with nothing to point at, and on the grouped validation split that region overlaps the
    tumour on two of three such images. A tumour-free call never gets a fallback.
    """
    mask = seg_prob >= SEG_THRESHOLD
    if tumour_called and not mask.any() and seg_prob.size and float(seg_prob.max()) > 0:
        mask = seg_prob >= FALLBACK_FRACTION * float(seg_prob.max())
    return mask


def seg_on_slice(seg: torch.Tensor, arr: np.ndarray, fg: np.ndarray | None = None) -> np.ndarray:
    """The seg head's map [1, 1, S, S] for 2D slice ``arr``, on the slice's grid, zero outside the head
    (``fg``: the slice's foreground mask, when the caller has it)."""
    fg = foreground_mask(arr) if fg is None else fg
    return map_on_slice(seg, arr, fg) * fg


# ---- field of view of 2D slices --------------------------------------------------------------------
# Every training slice shows a head that fills its frame (the larger side of the head's bounding box
# covers 74-100 % of the frame, median 99 %, on the grouped validation part). A slice with a wide
# border around the head (a screenshot, a padded export) is a different picture to the network: 40
# validation slices padded to 1.5x their size were classified right 22 times, 34 after re-framing.
# So when the head fills less than FRAME_BELOW of the frame, the slice is cropped (or padded) to a
# square around the head that it fills to FRAME_FILL, and maps come back through the inverse. No
# validation slice is re-framed (accuracy and Dice unchanged); applying it to every slice cost 0.6
# points of accuracy (the network was trained on the frames as they are).
FRAME_BELOW = 0.7
FRAME_FILL = 0.96
# a slice further from square than this is framed too, unless its head is stretched with it (see
# ``squashed_by_resize``): resizing a 2:1 picture to the network's square turned meningiomas into gliomas
ASPECT_LIMIT = 1.25


def squashed_by_resize(shape: tuple[int, int], head: tuple[int, int]) -> bool:
    """True when resizing a slice of ``shape`` to the network's square would squash a head of pixel
    extent ``head`` (rows, columns): the picture is far from square (a 512 x 256 screenshot with the head
    centred) while the head is not stretched with it. A head stretched as its frame is (a slice stored
    with rectangular pixels, 0.5 x 1.0 mm) is left to the resize, which makes it round again."""
    frame_aspect = shape[1] / shape[0]
    head_aspect = head[1] / head[0]
    return abs(np.log(frame_aspect)) > np.log(ASPECT_LIMIT) and abs(np.log(head_aspect / frame_aspect)) > np.log(ASPECT_LIMIT)


def head_frame(arr: np.ndarray, fg: np.ndarray | None = None) -> tuple[int, int, int] | None:
    """(top, left, side) of the square a slice is re-framed to, or ``None`` when the head already
    fills the frame as training slices do. Rows/columns with only a few foreground pixels (noise,
    text) do not count as head. ``fg``: the slice's foreground mask, when the caller has it."""
    fg = foreground_mask(arr) if fg is None else fg
    rows = np.where(fg.sum(1) >= max(2, 0.01 * arr.shape[1]))[0]
    cols = np.where(fg.sum(0) >= max(2, 0.01 * arr.shape[0]))[0]
    if rows.size == 0 or cols.size == 0:
        return None
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if max(h / arr.shape[0], w / arr.shape[1]) >= FRAME_BELOW and not squashed_by_resize(arr.shape, (h, w)):
        return None
    side = int(round(max(h, w) / FRAME_FILL))
    return (int(round((rows[0] + rows[-1]) / 2 - side / 2)), int(round((cols[0] + cols[-1]) / 2 - side / 2)), side)


def _overlap(frame: tuple[int, int, int], shape: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
    y0, x0, side = frame
    ys, xs, ye, xe = max(0, y0), max(0, x0), min(shape[0], y0 + side), min(shape[1], x0 + side)
    return slice(ys, ye), slice(xs, xe), slice(ys - y0, ye - y0), slice(xs - x0, xe - x0)


def to_frame(a: np.ndarray, frame: tuple[int, int, int] | None) -> np.ndarray:
    """``a`` (a slice or its mask) cut / zero-padded to ``frame``; unchanged when ``frame`` is None."""
    if frame is None:
        return a
    out = np.zeros((frame[2], frame[2]), dtype=a.dtype)
    iy, ix, oy, ox = _overlap(frame, a.shape)
    out[oy, ox] = a[iy, ix]
    return out


def map_on_slice(m: torch.Tensor, arr: np.ndarray, fg: np.ndarray | None = None) -> np.ndarray:
    """A network-resolution map [1, 1, S, S] of slice ``arr`` (as ``prepare_slice`` framed it) on the
    slice's own grid."""
    frame = head_frame(arr, fg)
    if frame is None:
        return resize_2d(m, arr.shape)[0, 0].numpy()
    framed = resize_2d(m, (frame[2], frame[2]))[0, 0].numpy()
    out = np.zeros(arr.shape, dtype=framed.dtype)
    iy, ix, oy, ox = _overlap(frame, arr.shape)
    out[iy, ix] = framed[oy, ox]
    return out


def prepare_mask(mask: np.ndarray, arr: np.ndarray, size: int) -> np.ndarray:
    """A slice's mask -> bool [size, size], framed like ``prepare_slice(arr, size)`` frames the slice."""
    m = to_frame(np.asarray(mask, dtype=np.float32), head_frame(arr))
    return resize_2d(torch.from_numpy(np.ascontiguousarray(m))[None, None], size)[0, 0].numpy() >= 0.5


@dataclass
class Prediction:
    """What ``Predictor.predict`` returns for one image.

    ``probabilities``: {class name: p} of the decision (summing to 1); ``label``: its most probable class;
    ``mask``: uint8 0/1 tumour mask and ``seg_prob``: float32 tumour probability 0..1, both [1, ...] on the
    input's grid and affine; ``slice_probabilities``: a volume's per-slice class probabilities [Z, C] in display
    order (axial slices, NaN for slices without brain), None for 2D; ``extra``: ``decision`` ("aligned" |
    "plain"), ``caveats`` (see :attr:`caveats`), ``familiarity`` (k-NN similarity to the training images and
    its threshold), ``window_classifier`` (the lesion-window classifier's opinion, when asked),
    ``text_similarities`` ({class: cosine to its prototype}), ``dark_border_fraction`` (2D), ``head_template_dice``
    (volumes), ``lesion_refiner``, ``mask_suppressed_by_classifier``.

    ``Predictor.forward_batch`` is the network alone: its probabilities skip the refiner and window classifier
    that ``predict`` applies, so they can differ from these."""

    probabilities: dict[str, float]
    label: str
    mask: MetaTensor  # uint8, same shape/affine as the input
    seg_prob: MetaTensor  # float32 tumour probability, same grid
    slice_probabilities: np.ndarray | None = None  # volumes: [Z, C]
    extra: dict = field(default_factory=dict)
    # the unit text-space vector the decision is the nearest class prototype of (2D slices and one-slice
    # files, with an aligned head): the findings' matched descriptions are its nearest ones
    text_vector: np.ndarray | None = None

    @property
    def caveats(self) -> list[str]:
        """Everything a reader of this prediction must be told, the familiarity note first: what ``predict``
        prints and what the MONAI Label answers carry under ``caveats``."""
        fam = self.extra.get("familiarity")
        note = familiarity_note(fam) if fam else None
        return ([note] if note else []) + list(self.extra.get("caveats", []))


def resize_2d(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """[B, C, H, W] -> [B, C, *size]; antialiased when shrinking."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def prepare_slice(arr: np.ndarray, size: int) -> torch.Tensor:
    """A raw 2D array -> normalised [1, 1, size, size] network input (re-framed when the head fills
    little of the frame: see ``head_frame``)."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise InvalidInputError(None, f"prepare_slice takes one 2D slice [H, W], got shape {arr.shape}")
    a = to_frame(normalize_intensity(arr), head_frame(arr))
    return resize_2d(torch.from_numpy(np.ascontiguousarray(a))[None, None], size)


# ---- field of view of volumes -----------------------------------------------------------------------
# A volume's display slices get ONE frame, from the union of its brain slices' foreground: a frame per
# slice would magnify the small top-of-head slices. A volume whose head fills its field of view (BraTS,
# most clinical scans) is left as it is; one padded with a wide empty border (a 100-voxel margin took a
# planted lesion's mask from 1156 voxels to 4) is seen as the training slices show a head.

def display_foreground(disp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground masks [N, H, W], indices of the brain slices: foreground >= 5 % of the largest)."""
    fg = np.array([foreground_mask(s) for s in disp])
    area = fg.reshape(fg.shape[0], -1).mean(1)
    return fg, np.where(area >= 0.05 * max(area.max(), 1e-9))[0]


def volume_frame(fg: np.ndarray) -> tuple[int, int, int] | None:
    """The frame of display slices whose foreground masks are ``fg`` [N, H, W] (None: as they are)."""
    union = np.asarray(fg, bool).any(0)
    return head_frame(union.astype(np.float32), union)


def framed_inputs(slices: np.ndarray, frame: tuple[int, int, int] | None, size: int) -> torch.Tensor:
    """Normalised display slices [N, H, W] -> network inputs [N, 1, size, size] through ``frame``."""
    a = np.stack([to_frame(s, frame) for s in slices]) if frame is not None else slices
    return resize_2d(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None], size)


def maps_from_frame(m: torch.Tensor, frame: tuple[int, int, int] | None, shape: tuple[int, int]) -> np.ndarray:
    """Network-resolution maps [N, 1, S, S] back onto display slices [N, *shape] (zero outside the frame)."""
    if frame is None:
        return resize_2d(m, shape)[:, 0].numpy()
    framed = resize_2d(m, (frame[2], frame[2]))[:, 0].numpy()
    out = np.zeros((len(framed), *shape), dtype=framed.dtype)
    iy, ix, oy, ox = _overlap(frame, shape)
    out[:, iy, ix] = framed[:, oy, ox]
    return out


def slice_inputs(img: MetaTensor, size: int, choose) -> torch.Tensor:
    """Network inputs [N, 1, size, size] of an image as read, prepared as ``Predictor.predict`` prepares
    them: a 2D image (or a one-slice volume) itself; of a volume, the display slices that
    ``choose(foreground [Z, H, W], brain slice indices)`` returns, in the volume's one frame."""
    from tumorlens.data.readers import is_volume

    arr = img.detach().cpu().numpy()[0]
    if not is_volume(img):
        return prepare_slice(slice_display(img, arr)[0], size)
    disp, _ = volume_to_display(arr, np.asarray(img.affine, dtype=float))
    if len(disp) == 1:
        return prepare_slice(disp[0], size)
    fg, use = display_foreground(disp)
    idx = np.asarray(choose(fg, use), dtype=int) if use.size else np.zeros(0, int)
    if idx.size == 0:
        raise InvalidInputError(img.meta.get("filename_or_obj"), "volume has no brain-like foreground")
    return framed_inputs(normalize_intensity(disp)[idx], volume_frame(fg[use]), size)


def representative_input(img: MetaTensor, size: int, slice_probabilities: np.ndarray | None = None) -> torch.Tensor:
    """One input [1, 1, size, size] that stands for the image: a 2D image itself; of a volume, the brain
    slice with the highest tumour probability (``slice_probabilities`` [Z, C] from the prediction;
    without them the middle brain slice)."""
    def most_tumour_like(fg: np.ndarray, use: np.ndarray) -> list[int]:
        if slice_probabilities is not None and len(slice_probabilities) == len(fg):
            tumour = 1.0 - np.nan_to_num(np.asarray(slice_probabilities)[use, -1], nan=1.0)
            return [int(use[int(np.argmax(tumour))])]
        return [int(use[len(use) // 2])]

    return slice_inputs(img, size, most_tumour_like)


# ---- volume <-> display slices -------------------------------------------------------------------

# Axes of the RAS-reoriented volume that become (slice, row, col) of the display; rows and cols are
# then flipped so that anterior/superior is on top and the patient's right on the left (radiological).
DISPLAY_AXES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


def display_plane(ras_shape: tuple[int, ...]) -> str:
    """The plane a [X, Y, Z] RAS volume is shown in: axial slices, except for a single coronal
    (Y == 1) or sagittal (X == 1) slice, which is one picture in its own plane. Cut into axial
    slices it would be a stack of 1-pixel-wide strips, each stretched to the network's square input."""
    x, y, z = (int(n) for n in ras_shape)
    if z > 1 and y == 1 and x > 1:
        return "coronal"
    if z > 1 and x == 1 and y > 1:
        return "sagittal"
    return "axial"


def volume_to_display(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict]:
    """Reorient a [X, Y, Z] volume to RAS and return its slices in radiological display order, plus
    what is needed to go back: axial slices [Z, rows (anterior->posterior), cols (patient right->left)],
    or, for a one-slice coronal / sagittal volume, that slice in its own plane [1, rows (superior->
    inferior), cols (patient right->left / anterior->posterior)] (see ``display_plane``)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(vol, ornt)
    plane = display_plane(ras.shape)
    disp = np.transpose(ras, DISPLAY_AXES[plane])[:, ::-1, ::-1]
    return np.ascontiguousarray(disp), {"ornt": ornt, "shape": vol.shape, "plane": plane}


def slice_display(img: MetaTensor, arr: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """A 2D slice [H, W] as a radiologist sees it (rows anterior or superior first, the patient's right on the
    left), the orientation every training slice had, and what ``slice_back`` needs (None: it is so already). A
    slice with patient geometry (a DICOM stored with its columns toward the patient's right, or transposed) had
    been read as stored: the same anatomy got another class (glioma 0.53-0.88 against pituitary 0.45; an outside
    probe, session 37). A picture (``meta["picture"]``, read upright after its EXIF tag) and an array without
    geometry (identity affine) are taken as stored."""
    affine = np.asarray(img.affine, dtype=float)
    if (getattr(img, "meta", {}) or {}).get("picture") or np.allclose(affine[:3, :3], np.eye(3)):
        return arr, None
    disp, back = volume_to_display(arr[:, :, None], affine)
    return disp[0], back


def slice_back(a: np.ndarray, back: dict | None) -> np.ndarray:
    """A display-oriented 2D array (``slice_display``) back onto the slice's stored grid."""
    return a if back is None else display_to_volume(np.asarray(a)[None], back)[:, :, 0]


def display_to_volume(disp: np.ndarray, back: dict) -> np.ndarray:
    """Display slices (as ``volume_to_display`` made them) back onto the volume's own grid."""
    axes = DISPLAY_AXES[back.get("plane", "axial")]
    ras = np.transpose(disp[:, ::-1, ::-1], np.argsort(axes))
    inv = nib.orientations.orientation_inverse(back["ornt"]) if hasattr(nib.orientations, "orientation_inverse") \
        else _inverse_ornt(back["ornt"])
    vol = nib.orientations.apply_orientation(ras, inv)
    if vol.shape != tuple(back["shape"]):
        raise ValueError(f"display slices of shape {disp.shape} do not map back onto a volume of {back['shape']}")
    return np.ascontiguousarray(vol)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(ornt)
    for i, (ax, flip) in enumerate(ornt):
        inv[int(ax)] = (i, flip)
    return inv


class Predictor:
    """Class probabilities + tumour mask for 2D images and volumes, on the input's geometry."""

    def __init__(self, model: LoadedModel | str | None = None, device: str = "cpu", batch_size: int = 16,
                 aligned: bool = True, refine: bool = True, head_check: bool = True, window: bool = True):
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        self.device = device
        self.batch_size = batch_size
        # volumes: ``check_head`` (~1 s); off for callers that register the volume anyway (``explain``)
        self.head_check = head_check
        # the lesion refiner (models/refiner.py) redraws the seg head's lesion at native resolution; it
        # is only stored next to a model when it raised seg Dice on that model's grouped validation part
        self.refiner = load_refiner(self.model.path, device) if refine else None
        # the lesion-window classifier (models/window.py) re-weighs the tumour types of a 2D slice called a
        # tumour; stored only when the fused decision, its fusion refitted without each patient group, was
        # more accurate on the model's grouped validation part
        self.window = load_window_classifier(self.model.path, device) if window else None
        # The text-aligned head (issue 8) decides the class when it is stored next to the model: it is
        # only stored when it was at least as accurate as the plain classifier on grouped validation.
        self.aligned_head = None
        if aligned:
            from tumorlens.alignment.api import load_alignment

            self.aligned_head = load_alignment(self.model)
        # the familiarity check's second measure (tumorlens.alignment.layer_statistics), with the aligned head's
        self.layer_statistics = load_layer_statistics(self.model) if self.aligned_head is not None else None
        if self.window is not None and self.aligned_head is not None \
                and self.window.text_key != self.aligned_head.texts.get("key"):
            log.warning("%s: the lesion-window classifier was anchored to other class descriptions than the text "
                        "head's; its opinion still counts, but the decision's text-space vector is the head's alone "
                        "until `tumorlens train-window` refits it", self.model.path)

    @property
    def decision(self) -> str:
        return "aligned" if self.aligned_head is not None else "plain"

    @property
    def size(self) -> int:
        return self.model.image_size

    @property
    def familiarity_calibration(self) -> dict | None:
        """k and threshold of the familiarity score (``tumorlens.alignment.familiarity``), if stored."""
        return None if self.aligned_head is None else self.aligned_head.meta.get("familiarity")

    @torch.no_grad()
    def forward_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None, np.ndarray | None]:
        """Normalised [B, 1, S, S] -> (probs [B, C], seg_prob [B, 1, S, S], familiarity [B, 2] (k-NN score, layer
        score or NaN without layer statistics) or None, the aligned head's unit text-space vectors [B, D] or
        None), one encoder pass."""
        net = self.model.net
        x = x.to(self.device)
        feats = net.encoder(x)
        seg = net.decoder(feats, x.shape[2:])
        fam = text = None
        if self.aligned_head is None:
            probs = net.classifier(feats[-1]).softmax(1)
        else:
            head = self.aligned_head
            pooled = net.classifier[2](net.classifier[1](net.classifier[0](feats[-1]))).float().cpu()
            logits, t = head.combine(head.parts(pooled), head.alpha, head.gamma)
            probs, text = logits.softmax(1), t.float().numpy()
            knn = assess_familiarity(head.cache, self.familiarity_calibration, pooled)
            if knn is not None:
                layers = (self.layer_statistics.scores(pooled_stages(feats)) if self.layer_statistics is not None
                          else np.full(len(knn), np.nan))
                fam = np.stack([knn, layers], 1)
        return probs.float().cpu(), seg.sigmoid().cpu(), fam, text

    def text_opinion(self, vector: np.ndarray | None) -> TextOpinion | None:
        """The aligned head's view of a slice from its text-space ``vector`` (None without an aligned head)."""
        if vector is None or self.aligned_head is None:
            return None
        head = self.aligned_head
        return TextOpinion(vector, float(head.scale), head.prototypes.numpy(), head.texts.get("key"))

    def _familiarity(self, scores: np.ndarray | None) -> Familiarity | None:
        """One image's familiarity from its slices' [N, 2] scores (``forward_batch``): the median of each."""
        cal = self.familiarity_calibration
        if scores is None or cal is None or scores.size == 0:
            return None
        knn, layers = np.median(scores, axis=0)
        stats = self.layer_statistics
        if stats is None or not np.isfinite(layers):
            return Familiarity(float(knn), float(cal["threshold"]), int(cal["k"]))
        return Familiarity(float(knn), float(cal["threshold"]), int(cal["k"]), float(layers), stats.threshold)

    def predict(self, img: MetaTensor) -> Prediction:
        """Class probabilities, tumour mask and caveats of one image as ``read_image`` returns it: a 2D slice
        [1, H, W] or a volume [1, X, Y, Z] (classified slice by slice). The mask and maps come back on the
        image's own grid and affine; see :class:`Prediction` for the fields."""
        arr = image_array(img, "nothing to classify")
        if is_volume(img):
            return self._predict_volume(img, arr)
        return self._predict_2d(img, arr)

    def lesion_probability(self, seg: torch.Tensor, arr: np.ndarray, called: bool) -> np.ndarray:
        """The seg head's map [1, 1, S, S] of 2D slice ``arr`` on the slice's grid (zero outside the head),
        its lesion redrawn at the slice's resolution when a refiner is stored. ``called``: the classifier
        calls a tumour (the coarse mask then falls back to the head's likeliest region)."""
        fg = foreground_mask(arr)
        prob = seg_on_slice(seg, arr, fg)
        if self.refiner is None:
            return prob
        return self.refiner.refine(arr, prob, tumour_mask(prob, called)) * fg

    def decide_2d(self, probs: np.ndarray, seg: torch.Tensor, arr: np.ndarray, text: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, dict | None, np.ndarray | None]:
        """(class probabilities, lesion probability on the slice, what the window classifier said or None, the
        decision's unit text-space vector or None) of 2D slice ``arr`` from the network's ``probs`` [C], seg
        map [1, 1, S, S] and text-space vector (all three from ``forward_batch``): how a slice's decision is
        made, for ``predict`` and ``tumorlens evaluate`` alike."""
        called = self.model.labels[int(probs.argmax())] != NO_TUMOUR
        lesion = self.lesion_probability(seg, arr, called)
        fused, said, vector = self.window_opinion(probs, arr, lesion, text)
        return fused, lesion, said, vector

    def window_opinion(self, probs: np.ndarray, arr: np.ndarray, lesion: np.ndarray, text: np.ndarray | None = None
                       ) -> tuple[np.ndarray, dict | None, np.ndarray | None]:
        """``probs`` of one slice re-weighed by the window classifier on the lesion ``lesion`` (its
        probability map on ``arr``'s grid) outlines, what it said, and the text-space vector the decision is
        the nearest prototype of (the aligned head's ``text``, joined by the window's where it spoke).
        Unchanged (and None) without a window classifier or without a tumour call. It can change which tumour
        type is named, never whether one is, so the mask stays the same."""
        labels = self.model.labels
        if self.window is None or labels[int(probs.argmax())] == NO_TUMOUR:
            return probs, None, text
        fused, said, vector = self.window.decide(probs, arr, tumour_mask(lesion, True), labels,
                                                 self.text_opinion(text))
        return fused, said, text if vector is None else vector

    def text_similarities(self, vector: np.ndarray | None) -> dict[str, float] | None:
        """Cosine similarity of a decision's text-space ``vector`` to each class prototype (None without one):
        its semantic margin is the own class's minus the best other's."""
        if vector is None or self.aligned_head is None:
            return None
        sims = self.aligned_head.prototypes.numpy() @ np.asarray(vector, np.float32)
        return {c: round(float(x), 4) for c, x in zip(CLASS_NAMES, sims, strict=True)}

    def _predict_2d(self, img: MetaTensor, arr: np.ndarray) -> Prediction:
        shown, back = slice_display(img, arr)  # decided as a radiologist sees it, answered on the stored grid
        return self._predict_slice(img, shown, lambda lesion: slice_back(lesion, back))

    def _predict_slice(self, img: MetaTensor, shown: np.ndarray, to_grid, slice_probs: bool = False) -> Prediction:
        """One slice ``shown`` as a radiologist sees it, decided as every 2D slice is; ``to_grid`` puts its lesion
        map back on the image's stored grid (``slice_probs``: the image is a one-slice volume)."""
        probs, seg, fam, text = self.forward_batch(prepare_slice(shown, self.size))
        p, lesion, said, vector = self.decide_2d(probs[0].numpy(), seg, shown, None if text is None else text[0])
        return self._result(img, p, to_grid(lesion), probs.numpy() if slice_probs else None, self._familiarity(fam),
                            said, vector)

    def _predict_volume(self, img: MetaTensor, arr: np.ndarray) -> Prediction:
        affine = np.asarray(img.affine, dtype=float)
        disp, back = volume_to_display(arr, affine)
        fg, use = display_foreground(disp)
        if use.size == 0:
            raise InvalidInputError(img.meta.get("filename_or_obj"), "volume has no brain-like foreground")
        if len(disp) == 1:
            # a one-slice file (3D Slicer sends a JPEG it opened as one) is the same 2D slice: decided by the same
            # steps, the lesion refiner's fallback included (without it a JPEG opened in Slicer got a 23-pixel
            # mask where the JPEG itself got 154, and other probabilities through the window classifier)
            res = self._predict_slice(img, disp[0], lambda lesion: display_to_volume(lesion[None], back), True)
            if self.head_check:
                check_head(res, img)
            return res
        seg_disp = np.zeros(disp.shape, dtype=np.float32)
        slice_probs = np.full((disp.shape[0], len(CLASS_NAMES)), np.nan, dtype=np.float32)
        # normalise on the whole volume's statistics so slices share one scale
        vnorm = normalize_intensity(disp)
        frame = volume_frame(fg[use])
        fams = []
        for start in range(0, use.size, self.batch_size):
            idx = use[start:start + self.batch_size]
            x = framed_inputs(vnorm[idx], frame, self.size)
            probs, seg, fam, _text = self.forward_batch(x)
            seg_disp[idx] = maps_from_frame(seg, frame, disp.shape[1:]) * fg[idx]
            slice_probs[idx] = probs.numpy()
            if fam is not None:
                fams.append(fam)
        probs = aggregate_slice_probabilities(slice_probs[use])
        if self.refiner is not None:  # slice by slice, where the head drew something
            for i in use:
                coarse = seg_disp[i] >= SEG_THRESHOLD
                if coarse.any():
                    seg_disp[i] = self.refiner.refine(disp[i], seg_disp[i], coarse) * fg[i]
        seg_vol = display_to_volume(seg_disp, back)
        # a volume's familiarity: the median over its brain slices (edge slices alone look unfamiliar)
        familiarity = self._familiarity(np.concatenate(fams) if fams else None)
        res = self._result(img, probs, seg_vol, slice_probs, familiarity)
        res.extra["caveats"].append(VOLUME_CAVEAT)
        tilt, turn = grid_tilt_degrees(img.affine), grid_turn_degrees(img.affine)
        if tilt > TILT_CAVEAT_DEGREES:
            res.extra["caveats"].append(TILT_CAVEAT.format(deg=tilt))
        if turn > TILT_CAVEAT_DEGREES:
            res.extra["caveats"].append(TURN_CAVEAT.format(deg=turn))
        if self.head_check:
            check_head(res, img)
        return res

    def _result(self, img, probs: np.ndarray, seg: np.ndarray, slice_probs,
                familiarity: Familiarity | None = None, window: dict | None = None,
                text_vector: np.ndarray | None = None) -> Prediction:
        labels = self.model.labels
        pdict = {lab: float(p) for lab, p in zip(labels, probs, strict=True)}
        label = max(pdict, key=pdict.get)
        meta = {k: v for k, v in img.meta.items() if k in IMAGE_META_KEYS}
        mask_np = tumour_mask(seg, label != NO_TUMOUR).astype(np.uint8)
        plane = np.squeeze(img.detach().cpu().numpy()[0])
        border = dark_border_fraction(plane) if plane.ndim == 2 else None  # 2D pictures: volumes have the head check
        extra = {"model": {"name": self.model.name, "version": self.model.version},  # as the findings record names it
                 "decision": self.decision, "lesion_refiner": self.refiner is not None,
                 "window_classifier_stored": self.window is not None,
                 "caveats": image_caveats(img)}
        if border is not None:
            extra["dark_border_fraction"] = round(border, 3)
        if familiarity is not None:
            extra["familiarity"] = familiarity.as_dict()
        if window is not None:
            extra["window_classifier"] = window
        sims = self.text_similarities(text_vector)
        if sims is not None:
            extra["text_similarities"] = sims
        if label == NO_TUMOUR and pdict[NO_TUMOUR] >= 0.5:
            extra["mask_suppressed_by_classifier"] = bool(mask_np.any())
            if mask_np.any():  # the mask is the seg head's own; a reader must not take it for a tumour found
                unit = "voxels" if mask_np.ndim == 3 and min(mask_np.shape) > 1 else "pixels"
                extra["caveats"].append(f"the segmentation head outlines {int(mask_np.sum())} {unit} although the "
                                        "classifier predicts no tumour: that outline is unconfirmed (the findings "
                                        "record leaves it empty)")
        mask = MetaTensor(torch.from_numpy(mask_np[None]), affine=img.affine.clone(), meta=dict(meta))
        segp = MetaTensor(torch.from_numpy(seg.astype(np.float32)[None]), affine=img.affine.clone(), meta=dict(meta))
        return Prediction(pdict, label, mask, segp, slice_probs, extra, text_vector)


def check_head(pred: Prediction, img: MetaTensor) -> None:
    """Add ``head_template_dice`` and, when no head pose fits, the head-template caveat to a volume's
    prediction: a coarse affine fit to MNI152 (~1 s). A torso phantom passed the familiarity check and was
    called meningioma p = 0.98 with the volume caveat alone. A one-slice volume is a 2D slice (answered like
    the same JPEG, which has no such check): nothing to add."""
    from tumorlens.atlas.registration import head_template_check

    if 1 in tuple(img.shape[-3:]):
        return
    dice, caveat = head_template_check(img)
    pred.extra["head_template_dice"] = None if dice is None else round(float(dice), 3)
    if caveat:
        pred.extra["caveats"].append(caveat)


def aggregate_slice_probabilities(p: np.ndarray, top_fraction: float = 0.1) -> np.ndarray:
    """Volume probabilities from per-slice ones [N, C] (last class = no tumour).

    A tumour occupies a minority of axial slices, so a plain mean would call every tumour volume
    tumour-free. The tumour probability is the mean of the top 10 % (at least 3) slices' tumour
    probabilities; the tumour-type split is the mean over those same slices.
    """
    tumour = 1.0 - p[:, -1]
    k = max(3, int(round(top_fraction * len(p))))
    k = min(k, len(p))
    top = np.argsort(-tumour)[:k]
    pt = float(tumour[top].mean())
    split = p[top, :-1].mean(0)
    split = split / max(split.sum(), 1e-9)
    return np.concatenate([pt * split, [1.0 - pt]]).astype(np.float32)
