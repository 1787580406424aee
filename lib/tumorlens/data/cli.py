"""``tumorlens split DATA_DIR --out DIR``: one part of the grouped split as a manifest folder; ``tumorlens
manifest DATA_DIR``: a manifest for a folder of class subfolders.

Every validation figure in the README and the model card is measured on the grouped validation part
of ``brain-mri-2d`` (20 % of the groups, seed 0: the split ``tumorlens train`` uses; since session 36 without
the images that share a slice run with training, ``tumorlens.data.splits``). This command
writes that part as a folder any command takes (``evaluate``, ``evaluate-saliency``,
``evaluate-reports``): the same manifest rows and columns, the images and masks as links to the
originals (the data is never copied unless ``--copy``).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from tumorlens.errors import InvalidInputError


def register(sub) -> None:
    p = sub.add_parser("split", help="write the grouped train or validation part of a manifest folder as its "
                                     "own manifest folder (links to the images)")
    p.add_argument("data_dir", help="a manifest folder (e.g. ../shared/data/brain-mri-2d)")
    p.add_argument("--out", required=True, help="new folder to create (must not exist or be empty)")
    p.add_argument("--part", choices=("val", "train"), default="val", help="which part (default: val)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the groups in validation (0.2)")
    p.add_argument("--seed", type=int, default=0, help="split seed (0: the shipped model's split)")
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    p.set_defaults(func=run_split)
    m = sub.add_parser("manifest", help="write manifest.csv for a folder with one subfolder per class "
                                        "(glioma/, notumor/, ...: the Kaggle layout)")
    m.add_argument("data_dir", help="the folder holding the class subfolders")
    m.set_defaults(func=run_manifest)


def write_split(data_dir: str | Path, out: str | Path, part: str = "val", val_fraction: float = 0.2,
                seed: int = 0, copy: bool = False) -> tuple[Path, int, int]:
    """Write ``part`` of the grouped split of ``data_dir`` to ``out``; returns (manifest path, rows, images
    set aside: in neither part, since they share a slice run with training)."""
    from tumorlens.data.manifest import load_manifest, read_rows
    from tumorlens.data.splits import training_split

    src, dest = Path(data_dir).resolve(), Path(out)
    if part not in ("val", "train"):
        raise ValueError(f"part must be 'val' or 'train', got {part!r}")
    if not 0 < val_fraction < 1:
        raise InvalidInputError(src, f"val fraction must be between 0 and 1, got {val_fraction}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidInputError(dest, "output folder exists and is not empty: nothing was written")
    manifest = load_manifest(src)
    train, val = training_split(manifest, val_fraction, seed)
    # the rows exactly as load_manifest parsed them (any separator, header case): re-reading the file
    # with a plain comma reader wrote a manifest whose paths named nothing
    _path, _raw, cols, parsed = read_rows(src)
    fields = [c for c in cols if c]
    rows = [{c: row.get(c) or "" for c in fields} for _line, row in parsed]
    if len(rows) != len(manifest.records):
        raise InvalidInputError(src / "manifest.csv", "rows and records disagree")
    idx = val if part == "val" else train
    if not idx:
        raise InvalidInputError(src / "manifest.csv", f"the {part} part of this split has no images "
                                f"({len(rows)} rows in {len({r.group for r in manifest.records})} group(s), "
                                f"val fraction {val_fraction}): nothing was written")
    chosen = [rows[i] for i in idx]
    dest.mkdir(parents=True, exist_ok=True)
    for r in chosen:
        for col in ("image", "mask"):
            rel = (r.get(col) or "").strip()
            if not rel:
                continue
            target = dest / rel
            if target.exists() or target.is_symlink():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copy2(src / rel, target)
            else:
                os.symlink(src / rel, target)
    path = dest / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(chosen)
    return path, len(chosen), len(rows) - len(train) - len(val)


def run_split(args) -> int:
    path, n, aside = write_split(args.data_dir, args.out, args.part, args.val_fraction, args.seed, args.copy)
    print(f"{args.part} part: {n} images -> {path}")
    if aside:
        print(f"{aside} images are in neither part: validation draws that share a slice run (the `run` column) "
              "with training images, so they are not new patients")
    return 0


def run_manifest(args) -> int:
    from tumorlens.data.manifest import write_class_folder_manifest

    path, counts = write_class_folder_manifest(args.data_dir)
    print(f"{sum(counts.values())} images ({', '.join(f'{c} {n}' for c, n in counts.items())}) -> {path}")
    print("no patient groups are known (no `group` column): every image is its own group, so a split of this "
          "folder is not patient-disjoint; add a `group` column if the patients are known")
    return 0
