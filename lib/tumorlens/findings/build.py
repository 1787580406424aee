"""Build a :class:`Findings` record from what the pipeline computed (arrays, dicts, the model).

Kept apart from the schema so that readers of the record (report, Slicer) need no numpy/torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tumorlens.caveats import familiarity_note
from tumorlens.errors import InvalidInputError
from tumorlens.findings.identifiers import safe_file_name
from tumorlens.findings.schema import (
    SCHEMA_VERSION,
    BBox,
    Classification,
    Findings,
    InputInfo,
    Lesion,
    MaskInfo,
    Patient,
    Placement,
    Provenance,
    Region,
    SaliencyInfo,
    Uncertainty,
)
from tumorlens.labels import CLASS_NAMES


def input_info(image: Any, file: str | Path | None = None) -> InputInfo:
    """Geometry of a MetaTensor from ``read_image`` (basename only, never the folder)."""
    meta = getattr(image, "meta", {}) or {}
    src = file if file is not None else meta.get("filename_or_obj", "image")
    kind = meta.get("kind", "image2d")
    dims = [int(d) for d in tuple(image.shape)[1:]]
    spacing = np.asarray(meta.get("spacing", [1.0] * len(dims)), dtype=float).ravel().tolist()
    if len(spacing) != len(dims):
        spacing = (spacing + [1.0] * len(dims))[: len(dims)]
    return InputInfo(
        file=safe_file_name(Path(str(src)).name) or "image",
        modality=str(meta.get("modality", "MR")),
        modality_from=meta.get("modality_from"),
        kind=kind,
        dims=dims,
        spacing_mm=[float(s) for s in spacing],
        spacing_known=bool(meta.get("spacing_known", True)),
    )


def _without_source(notes: list[str], image: Any, file: str | Path | None, safe: str) -> list[str]:
    """``notes`` with the input's path (as given, absolute or resolved) and name replaced by the record's
    ``safe`` file name: an error message quoting the path can carry a patient's name in its folders."""
    src = file if file is not None else (getattr(image, "meta", {}) or {}).get("filename_or_obj")
    if not src or not notes:
        return notes
    p = Path(str(src))
    forms = sorted({str(src), str(p), str(p.absolute()), str(p.resolve()), p.name} - {""}, key=len, reverse=True)
    out = []
    for note in notes:
        for form in forms:
            note = note.replace(form, safe)
        out.append(note)
    return out


def entropy(probabilities: Mapping[str, float]) -> float:
    """Shannon entropy (nats) of the class distribution: 0 = certain, ln(4) ~ 1.386 = uniform."""
    p = np.clip(np.asarray([probabilities[c] for c in CLASS_NAMES], dtype=float), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum())


def classification(probabilities: Mapping[str, float], uncertainty: Mapping[str, Any] | None = None,
                   familiarity: Mapping[str, Any] | None = None, window: Mapping[str, Any] | None = None) -> Classification:
    if set(probabilities) != set(CLASS_NAMES):
        raise InvalidInputError(None, f"probabilities must give exactly the classes {', '.join(CLASS_NAMES)}, "
                                      f"got {', '.join(map(str, probabilities)) or 'none'}")
    probs = {c: float(probabilities[c]) for c in CLASS_NAMES}
    if not all(np.isfinite(p) and 0.0 <= p <= 1.0 for p in probs.values()):
        raise InvalidInputError(None, f"probabilities must lie in [0, 1], got {probs}")
    total = sum(probs.values())
    if abs(total - 1.0) >= 1e-2:
        raise InvalidInputError(None, f"probabilities must sum to 1, got {total:.4g}")
    probs = {c: p / total for c, p in probs.items()}  # float32 softmax rounding
    label = max(probs, key=probs.get)
    unc = dict(uncertainty) if uncertainty else {"entropy": entropy(probs), "method": "softmax_entropy"}
    return Classification(label=label, probabilities=probs, uncertainty=Uncertainty(**unc),
                          familiarity=dict(familiarity) if familiarity else None,
                          window_opinion=dict(window) if window else None)


def mask_info(mask: np.ndarray, source: str, spacing_mm: Sequence[float], kind: str,
              spacing_known: bool = True) -> MaskInfo:
    """Size and bounding box of a binary mask (array without the channel axis). Without a known pixel spacing
    (a JPEG) there is no area in mm2: the record had stated the pixel count as one, which only the printed
    outputs said was unknown."""
    m = np.asarray(mask).astype(bool)
    if m.ndim == len(spacing_mm) + 1 and m.shape[0] == 1:
        m = m[0]
    n = int(m.sum())
    sp = np.asarray(spacing_mm, dtype=float)
    if kind == "volume" and m.ndim == sp.size == 3 and sum(s == 1 for s in m.shape) == 1:
        # a volume file of one slice is read as a 2D slice everywhere: its lesion is an area (a 5 mm slice's
        # area times its thickness read as a "volume" of 8.9 ml; a 1 mm one's as 0.0 ml)
        in_plane = [float(v) for v, s in zip(sp, m.shape, strict=True) if s != 1]
        return MaskInfo(source=source, empty=n == 0, voxels=n, area_mm2=n * float(np.prod(in_plane)),
                        volume_mm3=None, bbox=_bbox(m, n))
    vox_size = float(np.prod(sp))
    return MaskInfo(
        source=source,
        empty=n == 0,
        voxels=n,
        area_mm2=n * vox_size if kind == "image2d" and spacing_known else None,
        volume_mm3=n * vox_size if kind == "volume" else None,
        bbox=_bbox(m, n),
    )


def _bbox(m: np.ndarray, n: int) -> BBox | None:
    if not n:
        return None
    idx = np.argwhere(m)
    return BBox(min=[int(v) for v in idx.min(0)], max=[int(v) for v in idx.max(0)])


def provenance(model: Any | None = None) -> Provenance:
    """Model name, version and config hash of a ``LoadedModel`` (or 'none'), with the UTC time."""
    from tumorlens import __version__
    from tumorlens.config import config_hash
    from tumorlens.paths import code_commit

    if model is None:
        name, version, chash = "none", "0", "none"
    else:
        name, version = str(model.name), str(model.version)
        chash = config_hash(getattr(model, "config", {}) or {})
    return Provenance(
        model=name,
        model_version=version,
        config_hash=chash,
        tumorlens_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code_commit=code_commit(),
    )


def _plain(obj: Any) -> Any:
    """Numpy scalars and arrays (at any depth) as plain Python values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def build_findings(
    image: Any,
    probabilities: Mapping[str, float],
    *,
    masks: Sequence[tuple[str, np.ndarray]] | Sequence[MaskInfo] = (),
    saliency: Mapping[str, Any] | SaliencyInfo | None = None,
    atlas: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    patient: Mapping[str, Any] | Patient | None = None,
    model: Any | None = None,
    uncertainty: Mapping[str, Any] | None = None,
    familiarity: Mapping[str, Any] | None = None,
    file: str | Path | None = None,
    text_matches: Sequence[Mapping[str, Any]] = (),
    window: Mapping[str, Any] | None = None,
) -> Findings:
    """One validated record from the pieces.

    ``masks`` are ``(source, binary array on the input grid)`` pairs (or ready ``MaskInfo``);
    ``atlas`` is the dict of ``tumorlens.atlas.map_regions`` (``regions``, ``lesion``, ``placement``,
    ``notes``); ``familiarity`` is ``Prediction.extra["familiarity"]`` (an unfamiliar image also gets a
    note, which the report carries); ``text_matches`` the nearest class descriptions
    (``tumorlens.alignment.api.text_matches``); ``window`` is ``Prediction.extra["window_classifier"]`` (the
    lesion-window classifier's opinion, when it was asked). Invalid pieces raise ``InvalidInputError`` from :meth:`Findings.from_dict`.
    """
    info = input_info(image, file)
    mask_list = []
    for m in masks:
        if isinstance(m, MaskInfo):
            mask_list.append(m)
        else:
            src, arr = m
            mask_list.append(mask_info(arr, src, info.spacing_mm, info.kind, info.spacing_known))
    all_notes = list(notes)
    fam_note = familiarity_note(familiarity) if familiarity else None
    if fam_note and fam_note not in all_notes:
        all_notes.insert(0, fam_note)
    regions: list[Region | dict] = []
    lesion: Lesion | dict = Lesion()
    placement: Placement | dict = Placement()
    if atlas:
        # numpy scalars/arrays from the atlas stage -> JSON types (only the parts the record holds)
        atlas = _plain({k: atlas[k] for k in ("regions", "lesion", "placement", "notes") if k in atlas})
        regions = sorted(atlas.get("regions", []), key=lambda r: -float(r["fraction"]))
        lesion = atlas.get("lesion") or Lesion()
        placement = atlas.get("placement") or Placement()
        all_notes.extend(n for n in atlas.get("notes", []) if n not in all_notes)
    all_notes = _without_source(all_notes, image, file, info.file)
    record = {
        "schema_version": SCHEMA_VERSION,
        "input": info,
        "classification": classification(probabilities, uncertainty, familiarity, window),
        "masks": mask_list,
        "saliency": saliency,
        "regions": regions,
        "lesion": lesion,
        "placement": placement,
        "notes": all_notes,
        "patient": patient,
        "text_matches": [dict(t) for t in text_matches],
        "provenance": provenance(model),
    }
    # dump pydantic parts so that a single validation pass reports every problem together
    plain = {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in record.items()}
    plain["masks"] = [m.model_dump() for m in mask_list]
    plain["regions"] = [r.model_dump() if hasattr(r, "model_dump") else dict(r) for r in regions]
    return Findings.from_dict(plain, source=info.file)
