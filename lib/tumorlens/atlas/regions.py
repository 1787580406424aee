"""Mapping a lesion mask to Harvard-Oxford regions: the public ``map_regions`` entry point.

Why per-voxel max-probability: every lesion voxel gets exactly one label (its most probable atlas
structure, or "white matter / unlabelled" where all maps are 0, since the atlas has no white-matter
map), so fractions add up to 1 and nothing is silently dropped. Volumes go through registration to
MNI152; 2D slices through template-slice placement. When the placement is not trusted, no regions
are named: an honest "low confidence" beats an invented location.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from monai.data import MetaTensor
from scipy import ndimage

from tumorlens.atlas.harvard_oxford import (
    UNLABELLED,
    UNLABELLED_NAME,
    hemisphere_of,
    labels,
    max_prob_atlas,
    readable_name,
    template,
)
from tumorlens.caveats import not_a_head_note
from tumorlens.errors import InvalidInputError

MIDLINE_MM = 2.0  # voxels within this distance of x=0 count as midline
SIDE_SHARE = 0.05  # a side holding >= 5 % of the lesion counts as involved
UNPLACED_LESION = {"centroid_mni_mm": None, "laterality": "unknown", "crosses_midline": None}


def slice_in_display(image, img: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """A 2D slice ([H, W], or a one-slice [X, Y, Z] volume) of ``image`` and its mask as a radiologist sees them,
    as the network reads them (``tumorlens.inference.slice_display`` / ``volume_to_display``), and what
    ``slice_from_display`` needs to go back (None: they are so already)."""
    from tumorlens.inference import slice_display, volume_to_display

    if img.ndim == 2:
        shown, back = slice_display(image, img)
        return shown, slice_display(image, m.astype(np.uint8))[0] > 0, back
    affine = _np(image.affine).astype(float)
    d_img, back = volume_to_display(img, affine)
    d_m, _ = volume_to_display(m.astype(np.uint8), affine)
    return d_img[0], d_m[0] > 0, back


def slice_from_display(disp: np.ndarray, back: dict | None, shape2d: tuple[int, ...] | None) -> np.ndarray:
    """A display-oriented 2D array back onto the slice's own grid (``shape2d``: [H, W] for a 2D image, None
    for a one-slice volume)."""
    from tumorlens.inference import display_to_volume, slice_back

    if shape2d is not None:
        return slice_back(disp, back)
    return display_to_volume(np.asarray(disp)[None], back)


def display_axes_of_input(back: dict) -> tuple[int, int]:
    """Which input axes became the display's rows and columns."""
    from tumorlens.inference import DISPLAY_AXES

    ras_of_input = [int(a) for a, _flip in back["ornt"]]
    _, rows, cols = DISPLAY_AXES[back.get("plane", "axial")]
    return ras_of_input.index(rows), ras_of_input.index(cols)


def square_pixel_scale(meta: dict, back: dict | None = None) -> tuple[float, float]:
    """(rows, columns) zoom that makes a 2D slice's known pixel spacing square (1, 1 when it already is, or
    when the spacing is unknown: a picture's pixels are taken as square). ``back``: the slice was put in display
    orientation (``slice_in_display``), whose rows may be the stored columns."""
    sp = np.asarray(meta.get("spacing", ()), dtype=float).ravel()
    if not meta.get("spacing_known", False) or sp.size != 2 or np.any(sp <= 0):
        return (1.0, 1.0)
    if back is not None:
        r, c = display_axes_of_input(back)
        if (r, c) == (1, 0):
            sp = sp[::-1]
    if abs(np.log(sp[0] / sp[1])) <= np.log(1.02):
        return (1.0, 1.0)
    return (float(sp[0] / sp.min()), float(sp[1] / sp.min()))


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def summarise_points(mni_ras: np.ndarray, weights: np.ndarray | None = None) -> tuple[list[dict], dict]:
    """Regions and lesion summary from lesion points in MNI RAS mm (one point per lesion voxel).

    Returns ``(regions, lesion)`` in the findings-record shape (regions sorted by fraction desc).
    """
    pts = np.asarray(mni_ras, dtype=float).reshape(-1, 3)
    if len(pts) == 0:
        return [], {"centroid_mni_mm": None, "laterality": "unknown", "crosses_midline": None}
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, dtype=float)
    atlas = max_prob_atlas()
    inv = np.linalg.inv(atlas.affine)
    ijk = np.rint(inv[:3, :3] @ pts.T + inv[:3, 3:4]).T
    lab, prob = atlas.lookup(ijk)
    names = labels()
    regions = []
    total = float(len(pts))
    sides = _sides_of(pts[:, 0])
    for k in np.unique(lab):
        label = UNLABELLED if k < 0 else names[int(k)]
        # unlabelled voxels (mostly white matter) form one region per side they lie on: lumped together,
        # one side would be named for a lesion on both
        for side in (np.unique(sides[lab == k]) if k < 0 else [None]):
            sel = (lab == k) if side is None else (lab == k) & (sides == side)
            regions.append(
                {
                    "label": label,
                    "name": readable_name(label) if k >= 0 else UNLABELLED_NAME,
                    "hemisphere": hemisphere_of(label) if k >= 0 else str(side),
                    "fraction": round(float(sel.sum()) / total, 4),
                    "max_probability": float(prob[sel].max()) if k >= 0 else 0.0,
                }
            )
    regions.sort(key=lambda r: (-r["fraction"], r["label"], r["hemisphere"]))
    centroid = (pts * w[:, None]).sum(0) / max(w.sum(), 1e-9)
    x = pts[:, 0]
    # a side's share counts the lesion beyond the midline band and the lesion in that side's atlas regions:
    # the atlas splits its hemispheres at x = 0, so a lesion hugging the midline lay mostly in right-hand
    # regions while its x alone called it left (0.67 of it in right regions, and a record the schema refused)
    by_region = {h: sum(r["fraction"] for r in regions if r["hemisphere"] == h) for h in ("left", "right")}
    left = max(float((x < -MIDLINE_MM).mean()), by_region["left"])
    right = max(float((x > MIDLINE_MM).mean()), by_region["right"])
    crosses = bool(left >= SIDE_SHARE and right >= SIDE_SHARE)
    if crosses:
        laterality = "midline" if np.abs(x).max() <= 15.0 else "bilateral"
    elif left >= SIDE_SHARE:
        laterality = "left"
    elif right >= SIDE_SHARE:
        laterality = "right"
    else:
        laterality = "midline"
    lesion = {
        "centroid_mni_mm": [round(float(c), 2) for c in centroid],
        "laterality": laterality,
        "crosses_midline": crosses,
    }
    return regions, lesion


def point_labels(mni_ras: np.ndarray) -> list[tuple[str, str | None]]:
    """(atlas label or UNLABELLED, the side of an unlabelled point or None) of each MNI RAS point, by the
    same rule as the regions."""
    atlas = max_prob_atlas()
    pts = np.asarray(mni_ras, float).reshape(-1, 3)
    inv = np.linalg.inv(atlas.affine)
    ijk = np.rint(inv[:3, :3] @ pts.T + inv[:3, 3:4]).T
    lab, _ = atlas.lookup(ijk)
    names = labels()
    sides = _sides_of(pts[:, 0])
    return [(UNLABELLED, str(side)) if k < 0 else (names[int(k)], None) for k, side in zip(lab, sides, strict=True)]


def region_map_from(labels_of_voxels: list[tuple[str, str | None]], index: tuple[np.ndarray, ...], shape,
                    regions: list[dict]):
    """Per-voxel region index (1-based, in the order of ``regions``; 0 outside the lesion) and the
    segment names, for viewers (e.g. one Slicer segment per region). ``labels_of_voxels``: as
    ``point_labels`` gives them (an unlabelled voxel's region is the one of its side)."""
    order: dict = {}
    for i, r in enumerate(regions, start=1):
        order.setdefault((r["label"], r["hemisphere"] if r["label"] == UNLABELLED else None), i)
        order.setdefault((r["label"], None), i)  # a side later set to unknown (sagittal slices)
    rmap = np.zeros(shape, dtype=np.int16)
    rmap[index] = [order.get(key, order.get((key[0], None), 0)) for key in labels_of_voxels]
    return rmap, [sided_name(r["name"], r["hemisphere"]) for r in regions]


def sided_name(name: str, hemisphere: str) -> str:
    """A region's name for a viewer's segment, ``insular cortex (left)``: the name the TumorLens Slicer module
    gives the server's segments, so a segment reads the same from the command line, the server and Slicer."""
    return f"{name} ({hemisphere})" if hemisphere in ("left", "right", "midline") else name


def _sides_of(x: np.ndarray) -> np.ndarray:
    """Side of each point from its MNI x (RAS: negative is left; within ``MIDLINE_MM`` of 0: midline)."""
    x = np.asarray(x, float)
    return np.where(np.abs(x) <= MIDLINE_MM, "midline", np.where(x < 0, "left", "right"))


def lesion_to_mni(mask_xyz: np.ndarray, affine_ras: np.ndarray, transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """Warp a lesion mask onto the 1 mm template grid; return lesion points (MNI RAS) and weights.

    Resamples only the template box the lesion lands in (found on a 3 mm pass), so a B-spline
    warp of a small lesion costs little.
    """
    from tumorlens.atlas.registration import to_sitk

    tpl = template()
    tpl_img = to_sitk(np.zeros((1, 1, 1), np.float32), tpl.affine)  # geometry only
    les = to_sitk(mask_xyz.astype(np.float32), affine_ras)
    # coarse pass on a 3 mm copy of the template grid
    size = np.array(tpl.shape)
    coarse = sitk.Image([int(s) for s in np.ceil(size / 3).astype(int)], sitk.sitkFloat32)
    coarse.SetOrigin(tpl_img.GetOrigin())
    coarse.SetDirection(tpl_img.GetDirection())
    coarse.SetSpacing((3.0, 3.0, 3.0))
    c = sitk.GetArrayFromImage(sitk.Resample(les, coarse, transform, sitk.sitkLinear, 0.0))
    nz = np.argwhere(c > 0.0)  # (k, j, i)
    if len(nz) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    lo = np.maximum(nz.min(0)[::-1] * 3 - 4, 0)
    hi = np.minimum(nz.max(0)[::-1] * 3 + 7, size)
    ref = sitk.Image([int(v) for v in hi - lo], sitk.sitkFloat32)
    ref.SetSpacing((1.0, 1.0, 1.0))
    ref.SetDirection(tpl_img.GetDirection())
    ref.SetOrigin(tpl_img.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    fine = sitk.GetArrayFromImage(sitk.Resample(les, ref, transform, sitk.sitkLinear, 0.0))  # (k, j, i)
    sel = np.argwhere(fine >= 0.5)
    if len(sel) == 0:  # a lesion smaller than a template voxel: keep its peak
        sel = np.argwhere(fine == fine.max()) if fine.max() > 0 else sel
    ijk = sel[:, ::-1] + lo
    w = fine[sel[:, 0], sel[:, 1], sel[:, 2]]
    pts = (tpl.affine[:3, :3] @ ijk.T + tpl.affine[:3, 3:4]).T
    return pts, w


def _check_pair(image, mask) -> tuple[np.ndarray, np.ndarray, str | None]:
    path = image.meta.get("filename_or_obj") if hasattr(image, "meta") else None
    img = _np(image).astype(np.float32)
    m = _np(mask)
    if img.shape != m.shape and img.shape[1:] != m.shape and img.shape != m.shape[1:]:
        mpath = mask.meta.get("filename_or_obj") if hasattr(mask, "meta") else None
        raise InvalidInputError(
            mpath or path, f"mask shape {tuple(m.shape)} does not match image shape {tuple(img.shape)}"
        )
    if not np.isfinite(img).all():
        raise InvalidInputError(path, "image contains non-finite values")
    if img.size == 0 or not np.any(img != img.flat[0]):
        raise InvalidInputError(path, "image is empty or constant (all-zero): nothing to place in the atlas")
    img = img[0] if img.ndim in (3, 4) and img.shape[0] == 1 else img
    m = m[0] if m.ndim in (3, 4) and m.shape[0] == 1 else m
    return img, m > 0, path


def _floor2(x: float) -> str:
    """Two decimals rounded down: a confidence of 0.499 below the bar of 0.5 read "0.50 < 0.5"."""
    return f"{np.floor(x * 100) / 100:.2f}"


def _placement(method: str, quality: float, confidence: float, min_confidence: float, details: dict) -> dict:
    return {"method": method, "quality": round(quality, 4), "confidence": round(confidence, 3),
            "low_confidence": confidence < min_confidence, "details": details}


def map_regions(
    image: MetaTensor,
    mask: MetaTensor,
    *,
    min_confidence: float = 0.5,
    deformable: bool = True,
    working_spacing: float = 2.0,
) -> dict:
    """Atlas regions of ``mask`` on ``image``: a dict with ``regions``, ``lesion``, ``placement``, ``notes``.

    Volumes (1, X, Y, Z) are registered to MNI152 (affine + B-spline unless ``deformable=False``);
    2D images (1, H, W) are placed on the best-matching template slice. Below ``min_confidence``
    the placement is reported as low confidence and ``regions`` stays empty. When regions are named,
    ``region_map`` (per-voxel 1-based index into ``regions``, mask grid) and ``region_names`` are
    added for viewers.
    """
    img, m, path = _check_pair(image, mask)
    notes: list[str] = []
    is_vol = (getattr(image, "meta", {}) or {}).get("kind") == "volume" or img.ndim == 3
    one_slice = is_vol and img.ndim == 3 and 1 in img.shape
    if one_slice:
        notes.append("one-slice volume treated as a 2D slice")
        is_vol = False
    mask_source = "mask"
    extra: dict = {}
    if is_vol:
        from tumorlens.atlas.registration import register_to_mni

        aff = _np(image.affine).astype(float)
        reg = register_to_mni(
            MetaTensor(img[None], affine=aff, meta={k: v for k, v in (getattr(image, "meta", {}) or {}).items()
                                                    if k != "affine"}),
            deformable=deformable,
            exclude_mask=m if m.any() else None,
            working_spacing=working_spacing,
        )
        notes.extend(reg.notes)
        problem = reg.head_fit_problem()
        if problem:  # no pose fits a brain template: likely not a head at all
            notes.append(not_a_head_note(problem))
        placement = _placement("mni_registration", reg.quality_figure, reg.confidence, min_confidence, reg.summary())
        if not m.any():
            notes.append("lesion mask is empty: no regions to name")
            regions, lesion = summarise_points(np.zeros((0, 3)))
        elif placement["low_confidence"]:
            notes.append(
                f"registration to MNI152 is not trusted (confidence {_floor2(reg.confidence)} < {min_confidence}; "
                f"brain-mask Dice {reg.quality_figure:.2f}): regions are not named"
            )
            regions, lesion = [], dict(UNPLACED_LESION)
        else:
            pts, w = lesion_to_mni(m, aff, reg.transform)
            if len(pts) == 0:
                notes.append("the lesion maps outside the template after registration: no regions named")
            regions, lesion = summarise_points(pts, w)
            if len(pts):
                # the mapped lesion's template points, for the picture on the template (not in the findings record)
                extra = {**_volume_region_map(m, aff, pts, reg.transform, regions), "mni_points": pts}
    else:
        from tumorlens.atlas.placement import map_slice_mask, place_slice

        meta = getattr(image, "meta", {}) or {}
        # the slice as a radiologist sees it (rows anterior or superior first, the patient's right on the left),
        # which is what the template slices are matched in: a slice stored with its columns running toward the
        # patient's right (a DICOM with Image Orientation -1,0,0, a mirrored NIfTI) had its sides swapped. A
        # picture's fixed affine (JPEG, PNG) is that display already
        shape2d = m.shape if m.ndim == 2 else None
        img, m, back = slice_in_display(image, img, m)
        scale = square_pixel_scale(meta, back) if meta.get("kind") == "image2d" else (1.0, 1.0)
        if scale != (1.0, 1.0):  # the template's pixels are square: a 0.5 x 1.0 mm slice matched no plane
            notes.append("placed on a copy of the slice resampled to square pixels")
            pl = place_slice(ndimage.zoom(img, scale, order=1, grid_mode=True, mode="grid-constant"))
        else:
            pl = place_slice(img)
        placement = _placement("template_slice", pl.similarity, pl.confidence, min_confidence, pl.summary())
        notes.extend(pl.notes)
        if not m.any():
            notes.append("lesion mask is empty: no regions to name")
            regions, lesion = summarise_points(np.zeros((0, 3)))
        elif placement["low_confidence"]:
            notes.append(
                f"the slice matches no template plane well enough (confidence {_floor2(pl.confidence)} < "
                f"{min_confidence}): regions are not named"
            )
            regions, lesion = [], dict(UNPLACED_LESION)
        else:
            pts = map_slice_mask(m, pl, scale=scale)
            regions, lesion = summarise_points(pts)
            if pl.plane == "sagittal":  # which side of the midline a sagittal slice lies is not in the slice
                lesion["laterality"] = "unknown"
                lesion["crosses_midline"] = None
                lesion["centroid_mni_mm"] = None  # its x had been one side's guess (-64 beside "side unknown")
                for r in regions:
                    r["hemisphere"] = "unknown" if r["hemisphere"] in ("left", "right") else r["hemisphere"]
            elif meta.get("picture") or np.allclose(_np(getattr(image, "affine", np.eye(4))), np.eye(4)):
                # `locate` stated "laterality: right" for a picture drawn the other way (an outside probe, session 38)
                notes.append("the picture carries no patient orientation: its sides assume the radiological "
                             "convention (the patient's right on the image's left)")
            per_px = map_slice_mask(m, pl, per_pixel=True, scale=scale)
            rmap, names = region_map_from(point_labels(per_px), np.nonzero(m), m.shape, regions)
            # back onto the mask's own grid (a viewer lays it over the image as stored)
            extra = {"region_map": slice_from_display(rmap, back, shape2d), "region_names": names}
    lesion["mask_source"] = mask_source
    return {"regions": regions, "lesion": lesion, "placement": placement, "notes": notes, **extra}


def _volume_region_map(m: np.ndarray, aff: np.ndarray, pts: np.ndarray, transform, regions: list[dict]) -> dict:
    """Region of every input lesion voxel: the label of the nearest warped template lesion point.

    The transform only maps template -> input (a B-spline has no closed-form inverse), so the
    template points are carried into the input and each input voxel takes its nearest one's label.
    """
    from scipy.spatial import cKDTree

    labs = point_labels(pts)
    moved = np.array([transform.TransformPoint((float(-p[0]), float(-p[1]), float(p[2]))) for p in pts])
    moved[:, :2] *= -1  # LPS -> RAS
    idx = np.nonzero(m)
    vox = np.stack(idx + (np.ones(len(idx[0])),))
    world = (aff[:3, :] @ vox).T
    _, nearest = cKDTree(moved).query(world)
    rmap, names = region_map_from([labs[i] for i in nearest], idx, m.shape, regions)
    return {"region_map": rmap, "region_names": names}
