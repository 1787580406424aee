"""Dataset folders: ``manifest.csv`` with ``image``, ``label`` and optional ``mask``, ``box_*``, ``group``.

Paths are relative to the folder. Validation happens here, once, with errors that name the file.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tumorlens.data.readers import FILE_EXT
from tumorlens.errors import ManifestError
from tumorlens.labels import CLASS_NAMES, canonical_label

REQUIRED = ("image", "label")
BOX_COLUMNS = ("box_xc", "box_yc", "box_w", "box_h")


@dataclass(frozen=True)
class Record:
    image: Path
    label: str
    mask: Path | None = None
    group: str = ""
    box: tuple[float, float, float, float] | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_tumour(self) -> bool:
        return self.label != "no_tumor"


@dataclass
class Manifest:
    root: Path
    records: list[Record]
    sha256: str

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def subset(self, idx) -> Manifest:
        return Manifest(self.root, [self.records[i] for i in idx], self.sha256)


def _delimiter(header: str) -> str:
    """The header's separator: a comma, or the semicolon / tab that some spreadsheets write."""
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def read_rows(root: str | Path) -> tuple[Path, bytes, list[str], list[tuple[int, dict]]]:
    """Parse ``root/manifest.csv`` as every command reads it: (path, raw bytes, column names,
    [(line number, row)]).

    UTF-8 with or without BOM, comma / semicolon / tab separated, header names in any case or with
    spaces (" Image", "LABEL") mapped to the canonical columns. ``load_manifest`` validates these rows;
    ``tumorlens split`` writes them back, so both see the same columns whatever the spreadsheet wrote.
    """
    root = Path(root)
    path = root / "manifest.csv"
    if not root.is_dir():
        raise ManifestError(root, "data folder does not exist" if not root.exists() else "not a folder: give the "
                                  "folder that holds manifest.csv")
    if not path.is_file():
        classes = _class_subfolders(root) if root.is_dir() else {}
        hint = (f"; its class subfolders ({', '.join(sorted(f.name + '/' for f in classes))}) can be listed in one "
                f"with `tumorlens manifest {root}`") if classes else ""
        raise ManifestError(path, f"no manifest.csv in the data folder{hint}")
    raw = path.read_bytes()
    if not raw.strip():
        raise ManifestError(path, "manifest is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(path, "manifest is not UTF-8 text") from e
    lines = text.splitlines()
    reader = csv.DictReader(lines, delimiter=_delimiter(lines[0] if lines else ""))
    known = {c.lower(): c for c in (*REQUIRED, "mask", "group", *BOX_COLUMNS)}
    # header names as written by spreadsheets: " Image", "LABEL" name the same columns
    reader.fieldnames = [known.get(c.strip().lower(), c.strip()) for c in (reader.fieldnames or [])]
    cols = list(reader.fieldnames)
    # a repeated column would silently take its last value (csv.DictReader keeps one key per name)
    repeated = sorted({c for c in cols if c and cols.count(c) > 1})
    if repeated:
        raise ManifestError(path, f"column(s) {', '.join(repr(c) for c in repeated)} appear more than once in the "
                                  f"header: keep one")
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise ManifestError(path, f"missing required column(s): {', '.join(missing)} (found: {', '.join(cols)})")
    rows = []
    for line, row in enumerate(reader, start=2):
        if any(str(v).strip() for v in row.get(None) or []):  # values beyond the header's columns
            raise ManifestError(path, f"line {line}: more values than the header's {len(cols)} columns")
        short = [c for c in cols if row.get(c) is None]
        if short:  # fewer values than columns: csv leaves the rest None
            raise ManifestError(path, f"line {line}: no value for column(s) {', '.join(short)} "
                                      f"(the row has fewer values than the header)")
        row.pop(None, None)
        rows.append((line, row))
    return path, raw, cols, rows


def load_manifest(root: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate ``root/manifest.csv``."""
    root = Path(root)
    path, raw, _cols, rows = read_rows(root)
    records: list[Record] = []
    for line, row in rows:
        raw_label = (row.get("label") or "").strip()
        label = canonical_label(raw_label)
        if label is None:
            numeric = ("; numeric codes mean different classes in different datasets (figshare: 1 meningioma, "
                       "2 glioma, 3 pituitary), so write the class names") if raw_label.isdigit() else ""
            raise ManifestError(path, f"line {line}: unknown label {raw_label!r}; expected one of "
                                      f"{', '.join(CLASS_NAMES)} (any case; aliases such as 'notumor' are accepted)"
                                      f"{numeric}")
        img_rel = (row.get("image") or "").strip()
        if not img_rel:
            raise ManifestError(path, f"line {line}: empty image path")
        image = root / img_rel
        mask_rel = (row.get("mask") or "").strip()
        mask = root / mask_rel if mask_rel else None
        if check_files:
            if not image.is_file():
                raise ManifestError(image, f"listed on line {line} of {path} but missing")
            if mask is not None and not mask.is_file():
                raise ManifestError(mask, f"mask listed on line {line} of {path} but missing")
        box = None
        if all((row.get(c) or "").strip() for c in BOX_COLUMNS):
            try:
                box = tuple(float(row[c]) for c in BOX_COLUMNS)
            except ValueError as e:
                raise ManifestError(path, f"line {line}: box values must be numbers") from e
        group = (row.get("group") or "").strip() or f"img:{img_rel}"
        extra = {k: v for k, v in row.items() if k not in (*REQUIRED, "mask", "group", *BOX_COLUMNS)}
        records.append(Record(image=image, label=label, mask=mask, group=group, box=box, extra=extra))
    if not records:
        raise ManifestError(path, "manifest has a header but no rows")
    return Manifest(root=root, records=records, sha256=hashlib.sha256(raw).hexdigest())


# ---- a manifest from class subfolders -------------------------------------------------------------
# The public brain-tumour MRI sets on Kaggle come as one folder per class (``glioma/``, ``notumor/``,
# ``pituitary_tumor/`` ...) and no manifest: ``tumorlens manifest`` lists such a folder once, so that every
# command reads it the one way they read any dataset.

# the files the readers take by their name (DICOM files by ``.dcm``: a folder listing is no series check)
IMAGE_SUFFIXES = FILE_EXT + (".dcm",)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)


def _class_subfolders(root: Path) -> dict[Path, str]:
    """Subfolders of ``root`` whose name is a class (or an alias of one) -> that class."""
    out = {}
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            label = canonical_label(d.name)
            if label is not None:
                out[d] = label
    return out


def class_folder_rows(root: str | Path) -> list[dict[str, str]]:
    """``[{"image": relative path, "label": class}]`` for every image under ``root``'s class subfolders
    (searched recursively, sorted). Raises :class:`ManifestError` naming what is wrong with the layout."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, "not a folder")
    classes = _class_subfolders(root)
    others = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d not in classes)
    if not classes:
        raise ManifestError(root, "no class subfolders: expected folders named after the classes "
                                  f"({', '.join(CLASS_NAMES)}, or aliases such as notumor, pituitary_tumor)"
                                  + (f"; found {', '.join(others)}: give one of those folders if it holds the "
                                     "class subfolders" if others else ""))
    if others:
        raise ManifestError(root, f"subfolder(s) {', '.join(others)} name no class: move or rename them "
                                  f"(classes: {', '.join(CLASS_NAMES)}) so that no image is left out unnoticed")
    labels = list(classes.values())
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise ManifestError(root, f"more than one subfolder names the class(es) {', '.join(twice)}: merge them")
    rows = []
    for d, label in classes.items():
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        rows += [{"image": p.relative_to(root).as_posix(), "label": label} for p in files]
    if not rows:
        raise ManifestError(root, "the class subfolders hold no images (JPEG/PNG/BMP/TIFF, NIfTI, DICOM, NRRD)")
    return rows


def write_class_folder_manifest(root: str | Path) -> tuple[Path, dict[str, int]]:
    """Write ``root/manifest.csv`` (columns ``image,label``) from its class subfolders; an existing manifest
    is never replaced. Returns (path, images per class)."""
    from tumorlens.atomic import atomic_write_text

    root = Path(root)
    path = root / "manifest.csv"
    if path.exists():
        raise ManifestError(path, "a manifest already exists: nothing was written")
    rows = class_folder_rows(root)
    lines = ["image,label"] + [f"{_csv_field(r['image'])},{r['label']}" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    counts = {c: sum(r["label"] == c for r in rows) for c in CLASS_NAMES}
    return path, {c: n for c, n in counts.items() if n}


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text
