"""``tumorlens locate IMAGE --mask MASK``: which Harvard-Oxford structures a lesion mask touches."""

from __future__ import annotations

import json


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


def run_locate(args) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tumorlens.atlas.regions import map_regions
    from tumorlens.data import read_image
    from tumorlens.data.readers import read_mask
    from tumorlens.errors import InvalidInputError

    img = read_image(args.image)
    mask = read_mask(args.mask)
    if tuple(mask.shape[1:]) != tuple(img.shape[1:]):
        raise InvalidInputError(
            args.mask, f"mask shape {tuple(mask.shape[1:])} does not match image shape {tuple(img.shape[1:])}"
        )
    what = "registering to MNI152" if img.meta.get("kind") == "volume" and min(img.shape[1:]) > 1 else "placing slice"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as prog:
        prog.add_task(f"{what} ...", total=None)
        out = map_regions(img, mask, min_confidence=args.min_confidence, deformable=not args.no_deformable)
    pl = out["placement"]
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
        from pathlib import Path

        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
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
