"""``tumorlens locate IMAGE --mask MASK``: which Harvard-Oxford structures a lesion mask touches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tumorlens.errors import InvalidInputError

if TYPE_CHECKING:  # torch / MONAI load only when a command runs, not when the CLI parser is built
    from monai.data import MetaTensor


def register(sub) -> None:
    p = sub.add_parser("locate", help="atlas regions of a lesion mask (registration to MNI152, or 2D slice placement)")
    p.add_argument("image", help="NIfTI/DICOM volume, or a 2D JPEG/PNG/DICOM slice")
    p.add_argument("--mask", required=True, help="lesion mask on the same grid (values > 0 are lesion)")
    p.add_argument("--json", dest="json_out", default=None, help="write the full result here")
    p.add_argument("--no-deformable", action="store_true", help="affine registration only (faster, less exact)")
    p.add_argument("--min-confidence", type=float, default=0.5, help="below this, no regions are named")
    p.add_argument("--top", type=int, default=10, help="regions to print (all go to --json)")
    p.set_defaults(func=run_locate)
    v = sub.add_parser("train-view", help="train the slice-plane classifier 2D placement uses (seconds, CPU)")
    v.add_argument("data_dir", nargs="?", default=None,
                   help="folder with manifest.csv and a `view` column (default: ../shared/data/brain-mri-2d)")
    v.add_argument("--out", default=None, help="output folder (default: models/slice-view)")
    v.add_argument("--val-fraction", type=float, default=0.2)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--default-view", choices=("axial", "coronal", "sagittal"), default=None,
                   help="plane of rows with an empty view (brain-mri-2d's Br35H rows are axial)")
    v.set_defaults(func=run_train_view)


def mask_on_image_grid(mask: MetaTensor, img: MetaTensor, where: str | Path) -> MetaTensor:
    """``mask`` (as ``read_mask`` reads it) on ``img``'s voxel grid, or a typed error naming ``where``.

    Equal shapes are not enough: the same lesion stored with its x axis flipped (and a matching affine)
    has the image's shape, and taken in the image's voxel order it would land in the other hemisphere.
    A mask with its own geometry is turned into the image's axis order and directions by the two
    affines' orientations (as ``read_label_like`` does for training labels), and must then lie on the
    image's grid exactly; one without geometry (identity affine, or a picture) is taken in the image's voxel order.
    Anything else (another spacing, field of view or obliquity) would need resampling: refused.
    """
    import torch
    from monai.data import MetaTensor

    from tumorlens.data.readers import reorient_like, same_grid

    arr = mask.detach().cpu().numpy()[0]
    want = tuple(int(n) for n in img.shape[1:])
    m_aff = np.asarray(mask.affine, dtype=float)
    i_aff = np.asarray(img.affine, dtype=float)
    # a picture (PNG, JPEG...) has no geometry of its own: its rows and columns are the image's (a 2D DICOM
    # slice is read in the same order), whatever spacing the image's header gives
    picture = mask.meta.get("kind") == "image2d" and mask.meta.get("spacing_known") is False
    if arr.ndim == len(want) and (same_grid(m_aff, i_aff) or np.allclose(m_aff, np.eye(4)) or picture):
        if arr.shape != want:
            raise InvalidInputError(where, f"mask shape {arr.shape} does not match image shape {want}")
        if not same_grid(m_aff, i_aff) and not picture:  # said, not silently assumed (a probe's finding)
            mask.meta["grid_assumed"] = ("the mask's header holds no geometry (identity affine): it was taken in the "
                                         "image's voxel order; save it with the image's affine to be sure")
        return mask
    a3 = arr if arr.ndim == 3 else arr.reshape(arr.shape + (1,) * (3 - arr.ndim))
    moved, moved_aff = reorient_like(a3, m_aff, i_aff)
    want3 = want + (1,) * (3 - len(want))
    if moved.shape != want3 or not same_grid(moved_aff, i_aff):
        raise InvalidInputError(
            where, f"mask grid (shape {arr.shape}, axes {''.join(_axcodes(m_aff))}) does not lie on the image's grid "
                   f"(shape {want}, axes {''.join(_axcodes(i_aff))}) even after reordering its axes: a different "
                   "spacing, field of view or obliquity; resample the mask onto the image first")
    out = np.ascontiguousarray(moved.reshape(want)).astype(np.uint8)
    return MetaTensor(torch.from_numpy(out[None]), affine=img.affine.clone(),
                      meta={**{k: v for k, v in mask.meta.items() if k != "affine"}, "original_affine": i_aff.copy(), "spatial_shape": np.asarray(want)})


def _axcodes(affine: np.ndarray) -> tuple[str, ...]:
    from nibabel.orientations import aff2axcodes

    return tuple(c or "?" for c in aff2axcodes(affine))


def run_locate(args) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tumorlens.atlas.regions import map_regions
    from tumorlens.atomic import atomic_write_text
    from tumorlens.data import read_image
    from tumorlens.data.readers import read_mask
    from tumorlens.evaluation.cli import check_output

    if args.json_out:
        check_output(args.json_out)  # before a registration of a minute, not after it
    img = read_image(args.image)
    mask = mask_on_image_grid(read_mask(args.mask), img, args.mask)
    what = "registering to MNI152" if img.meta.get("kind") == "volume" and min(img.shape[1:]) > 1 else "placing slice"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as prog:
        prog.add_task(f"{what} ...", total=None)
        out = map_regions(img, mask, min_confidence=args.min_confidence, deformable=not args.no_deformable)
    pl = out["placement"]
    if mask.meta.get("grid_assumed"):
        out["notes"] = [mask.meta["grid_assumed"], *out["notes"]]
    result = {
        "image": str(args.image).rsplit("/", 1)[-1],
        "regions": out["regions"],
        "lesion": out["lesion"],
        "registration": pl,
        "notes": out["notes"],
    }
    print(f"{'label':<58} {'name':<44} {'hemisphere':<10} {'fraction':>8}")
    for r in out["regions"][: args.top]:
        print(f"{r['label']:<58} {r['name'][:44]:<44} {r['hemisphere']:<10} {r['fraction']:>8.3f}")
    if len(out["regions"]) > args.top:
        print(f"... {len(out['regions']) - args.top} more (see --json)")
    print(f"lesion.centroid_mni_mm: {out['lesion']['centroid_mni_mm']}  laterality: {out['lesion']['laterality']}"
          f"  crosses_midline: {out['lesion']['crosses_midline']}")
    print(f"registration: {pl['method']} quality={pl['quality']} confidence={pl['confidence']} "
          f"low_confidence={pl['low_confidence']} details={json.dumps(pl['details'])}")
    for n in out["notes"]:
        print(f"note: {n}")
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(result, indent=2))
    return 0


def run_train_view(args) -> int:
    from tumorlens.atlas.view import VIEW_MODEL, train_view_classifier
    from tumorlens.paths import models_dir, shared_data_dir

    data = args.data_dir or shared_data_dir() / "brain-mri-2d"
    clf, m = train_view_classifier(data, args.val_fraction, args.seed, default_view=args.default_view)
    out = clf.save(args.out or models_dir() / VIEW_MODEL)
    print(f"slice-view classifier: {m['n_train']} training slices (+ mirrors) and {m['n_template_examples']} "
          f"template slices, alpha={m['alpha']}")
    print(f"grouped validation ({m['n_val']} slices): accuracy {m['val_accuracy']:.3f}  "
          + "  ".join(f"{k} {v:.3f}" for k, v in m["val_per_view_recall"].items()))
    print(f"p >= 0.9 on {m['val_share_p_over_0.9']:.0%} of them, accuracy there {m['val_accuracy_p_over_0.9']}")
    print(f"wrote {out}")
    return 0
