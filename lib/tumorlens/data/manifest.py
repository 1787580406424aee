"""Dataset folders: ``manifest.csv`` with ``image``, ``label`` and optional ``mask``, ``box_*``, ``group``.

Paths are relative to the folder. Validation happens here, once, with errors that name the file.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    if not path.is_file():
        raise ManifestError(path, "no manifest.csv in the data folder")
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
            raise ManifestError(path, f"line {line}: unknown label {raw_label!r}; expected one of "
                                      f"{', '.join(CLASS_NAMES)} (any case; aliases such as 'notumor' are accepted)")
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
