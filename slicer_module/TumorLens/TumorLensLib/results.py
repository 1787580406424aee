"""Parse what the tumorlens MONAI Label app answers into plain data the Logic and widget can use.

Kept apart from Slicer so every rule here (model types, label names, segment names, probabilities)
is unit-tested without a viewer.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "no_tumor")
LABEL_MODEL_TYPES = ("segmentation", "deepedit", "deepgrow", "detection", "scribbles", "saliency")


class ResponseError(ValueError):
    """The server answered, but not in the shape tumorlens expects (message says what is wrong)."""


@dataclass
class ModelInfo:
    """One model as listed by ``/info/``; ``returns_label`` tells whether it sends a label file."""

    name: str
    type: str
    labels: dict[str, int]
    description: str = ""
    dimension: int | None = None

    @property
    def returns_label(self) -> bool:
        return self.type.lower() in LABEL_MODEL_TYPES or self.name.startswith("saliency")

    @property
    def display(self) -> str:
        return f"{self.name} ({self.type})"


def parse_label_map(labels: Any) -> dict[str, int]:
    """``{name: index}`` from MONAI Label's two spellings: a dict, or a list (index = position + 1)."""
    if labels is None:
        return {}
    if isinstance(labels, dict):
        out = {}
        for k, v in labels.items():
            try:
                out[str(k)] = int(v)
            except (TypeError, ValueError):
                raise ResponseError(f"label index of {k!r} is not an integer: {v!r}") from None
        return out
    if isinstance(labels, (list, tuple)):
        return {str(n): i + 1 for i, n in enumerate(labels)}
    raise ResponseError(f"labels must be a dict or list, got {type(labels).__name__}")


def parse_models(info: dict) -> list[ModelInfo]:
    """All models of ``/info/`` including classification and report (the stock plugin hides them)."""
    models = info.get("models")
    if not isinstance(models, dict):
        raise ResponseError("/info/ has no 'models' dictionary: is this a MONAI Label server?")
    out = []
    for name, m in models.items():
        m = m if isinstance(m, dict) else {}
        out.append(ModelInfo(name=str(name), type=str(m.get("type", "unknown")),
                             labels=parse_label_map(m.get("labels")),
                             description=str(m.get("description", "")), dimension=m.get("dimension")))
    return sorted(out, key=lambda x: x.name)


def parse_strategies(info: dict) -> list[str]:
    s = info.get("strategies") or {}
    return sorted(s) if isinstance(s, dict) else [str(x) for x in s]


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def findings_of(params: dict) -> dict | None:
    """The findings record carried in infer params (a dict, or a JSON string), checked lightly."""
    f = _maybe_json(params.get("findings"))
    if f is None:
        return None
    if not isinstance(f, dict):
        raise ResponseError(f"'findings' is {type(f).__name__}, not a JSON object")
    if "schema_version" not in f:
        raise ResponseError("'findings' has no schema_version: not a tumorlens findings record")
    if not str(f["schema_version"]).startswith("1."):
        raise ResponseError(f"findings schema_version {f['schema_version']!r} is not supported (expected 1.x)")
    return f


def _answer_or_findings(params: dict, key: str, classification_key: str) -> Any:
    """``params[key]`` of a classification/segmentation answer, else the findings record's
    ``classification[classification_key]``; None when neither says."""
    value = _maybe_json(params.get(key))
    if value is None:
        f = findings_of(params)
        if f and isinstance(f.get("classification"), dict):
            value = f["classification"].get(classification_key)
    return value


def familiarity_of(params: dict) -> dict | None:
    """How familiar the model found the image (``score``, ``threshold``, ``familiar``, and ``layer_score``,
    ``layer_threshold`` when the model has layer statistics), from a classification/segmentation answer or its
    findings record; None when the server did not say."""
    fam = _answer_or_findings(params, "familiarity", "familiarity")
    if fam is None:
        return None
    try:
        out = {"score": float(fam["score"]), "threshold": float(fam["threshold"]), "familiar": bool(fam["familiar"])}
        if fam.get("layer_score") is not None:
            out |= {"layer_score": float(fam["layer_score"]), "layer_threshold": float(fam["layer_threshold"])}
        return out
    except (KeyError, TypeError, ValueError):
        raise ResponseError(f"'familiarity' is not a score/threshold/familiar record: {fam!r}") from None


def caveats_of(params: dict) -> list[str]:
    """What the answer must be read with (``caveats`` of a classification/segmentation answer: an unfamiliar
    image, a volume classified slice by slice, a volume no head pose fits); [] when the server said none."""
    cav = _maybe_json(params.get("caveats"))
    if cav is None:
        return []
    if not isinstance(cav, list) or not all(isinstance(c, str) for c in cav):
        raise ResponseError(f"'caveats' is not a list of sentences: {cav!r}")
    return [c for c in cav if c.strip()]


def familiarity_warning(fam: dict | None) -> str | None:
    """One line for the results panel when the image is unlike the model's training images."""
    if not fam or fam["familiar"]:
        return None
    why = []
    if fam["score"] < fam["threshold"]:
        why.append(f"familiarity {fam['score']:.3f} below {fam['threshold']:.3f}")
    if fam.get("layer_score") is not None and fam["layer_score"] > fam["layer_threshold"]:
        why.append(f"layer score {fam['layer_score']:.3f} above {fam['layer_threshold']:.3f}")
    return f"Image is unlike the model's training images ({'; '.join(why)}): the result may be unreliable."


def matched_descriptions(findings: dict | None, n: int = 2) -> list[str]:
    """Lines for the results panel: the clinical descriptions the image matched in the model's text
    space (the findings record's ``text_matches``), nearest first."""
    out = []
    for t in ((findings or {}).get("text_matches") or [])[:n]:
        try:
            out.append(f"matches \"{t['description']}\" ({t['class_name']}, similarity {float(t['similarity']):.2f})")
        except (KeyError, TypeError, ValueError):
            raise ResponseError(f"'text_matches' entry is not a description/class_name/similarity record: {t!r}") from None
    return out


def window_opinion_line(params: dict) -> str | None:
    """One line for the results panel when the lesion-window classifier took part in the decision (the
    ``window_classifier`` of a classification/segmentation answer, or the findings record's
    ``classification.window_opinion``); None when the server did not say."""
    w = _answer_or_findings(params, "window_classifier", "window_opinion")
    if w is None:
        return None
    try:
        window, net = dict(w["probabilities"]), dict(w["network_probabilities"])
        first_w, first_n = max(window, key=window.get), max(net, key=net.get)
        if not w["changed_label"]:
            return f"Lesion-window classifier agreed on the tumour type ({first_w}, {float(window[first_w]):.2f})."
        return (f"Tumour type settled by the lesion-window classifier ({first_w}, {float(window[first_w]):.2f}); "
                f"the whole-slice network alone favoured {first_n} ({float(net[first_n]):.2f}).")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ResponseError(f"'window_classifier' is not a probabilities/network_probabilities/changed_label record: {w!r}") from None


def label_names_of(params: dict) -> dict[str, int]:
    """``label_names`` of an infer answer; background (index 0) dropped."""
    names = parse_label_map(_maybe_json(params.get("label_names")))
    return {k: v for k, v in names.items() if v != 0 and k.lower() != "background"}


def probabilities_of(params: dict) -> dict[str, float]:
    """Per-class probabilities in the project's class order, from an infer answer or its findings."""
    cand = params.get("probabilities")
    if cand is None:
        cls = params.get("classification")
        if isinstance(cls, dict):
            cand = cls.get("probabilities")
    if cand is None:
        f = findings_of(params)
        if f and isinstance(f.get("classification"), dict):
            cand = f["classification"].get("probabilities")
    if cand is None:
        raise ResponseError("no per-class probabilities in the answer")
    if isinstance(cand, (list, tuple)):
        if len(cand) != len(CLASS_NAMES):
            raise ResponseError(f"{len(cand)} probabilities for {len(CLASS_NAMES)} classes")
        cand = dict(zip(CLASS_NAMES, cand, strict=True))
    try:
        probs = {str(k): float(v) for k, v in cand.items()}
    except (TypeError, ValueError, AttributeError):
        raise ResponseError(f"probabilities are not numbers: {cand!r}") from None
    ordered = {k: probs[k] for k in CLASS_NAMES if k in probs}
    ordered.update({k: v for k, v in probs.items() if k not in ordered})
    return ordered


# ---- atlas region names --------------------------------------------------------------------------

_SIDE = re.compile(r"^(left|right)[_\s-]+", re.IGNORECASE)


def readable_region(label: str) -> tuple[str, str]:
    """Harvard-Oxford label -> (readable name, hemisphere): ``Left_Insular_Cortex`` ->
    (``insular cortex``, ``left``). Labels without a side (``Brain-Stem``) are ``midline``."""
    m = _SIDE.match(label)
    hemi = m.group(1).lower() if m else ("unknown" if label.startswith("Unlabelled") else "midline")
    rest = label[m.end():] if m else label
    name = re.sub(r"[_\-]+", " ", rest).strip().lower()
    name = name.replace("ventrical", "ventricle")  # the atlas CSV's own typo
    return name or label, hemi


def to_ascii(text: str) -> str:
    """ASCII look-alike of a name (accents dropped, dashes and quotes plain)."""
    text = text.replace("\u2014", "-").replace("\u2013", "-").replace("\u2019", "'")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def segment_name(name: str, hemisphere: str) -> str:
    """The name a segment gets in Slicer: readable region plus side, e.g. ``insular cortex (left)``."""
    return f"{name} ({hemisphere})" if hemisphere in ("left", "right", "midline") else name


@dataclass
class SegmentSpec:
    """One segment to create: label value in the label file, its name, colour, and its atlas data."""

    value: int
    name: str
    color: tuple[float, float, float]
    label: str
    fraction: float | None = None
    extra: dict = field(default_factory=dict)


GENERIC_MASK_NAMES = ("salient area", "lesion", "tumour", "tumor")


def segment_specs(label_names: dict[str, int], findings: dict | None, colors) -> list[SegmentSpec]:
    """Pair every label value with a readable, region-based name and a distinct colour.

    The region's readable name and hemisphere come from the findings record when it lists that
    atlas label, otherwise from the label itself; names that are not atlas labels (``tumour``,
    ``salient area``) are kept, with the dominant region appended when the findings name one.
    """
    rlist = [r for r in (findings or {}).get("regions", []) if isinstance(r, dict)]
    regions = {r.get("label"): r for r in rlist}
    # the server may name values by the readable name ("insular cortex", unique) or "left insular cortex"
    by_name: dict[str, list[dict]] = {}
    for r in rlist:
        by_name.setdefault(str(r.get("name", "")).lower(), []).append(r)
        by_name.setdefault(f"{r.get('hemisphere', '')} {r.get('name', '')}".lower(), []).append(r)
        by_name.setdefault(segment_name(str(r.get("name", "")), str(r.get("hemisphere", ""))).lower(), []).append(r)
    top = max(rlist, key=lambda r: r.get("fraction", 0.0)) if rlist else None
    specs = []
    for i, (label, value) in enumerate(sorted(label_names.items(), key=lambda kv: kv[1])):
        r = regions.get(label)
        if r is None and len(by_name.get(label.lower(), [])) == 1:
            r = by_name[label.lower()][0]
        if r is not None:
            name = segment_name(r.get("name") or readable_region(label)[0], r.get("hemisphere", "unknown"))
            frac = r.get("fraction")
        elif _SIDE.match(label) or label in ("Brain-Stem",) or label.startswith("Unlabelled"):
            name = segment_name(*readable_region(label))
            frac = None
        elif top is not None and len(label_names) == 1:
            # one binary lesion label (no per-voxel region map): name it by its main region and keep
            # the full list (readable name, side, share) for the panel and the segment's tags
            more = len(rlist) - 1
            # the server's word for the mask ("salient area": where the classifier looked); an older server's
            # label of joined region names was its saliency mask too
            what = label.replace("_", " ") if label.lower() in GENERIC_MASK_NAMES else "salient area"
            name = f"{what} - " + segment_name(str(top.get("name", "")), str(top.get("hemisphere", "unknown")))
            name += f" +{more} more" if more > 0 else ""
            frac = None
        else:
            name = label.replace("_", " ")
            frac = None
        spec = SegmentSpec(value=int(value), name=name, color=colors(i), label=label, fraction=frac)
        if len(label_names) == 1 and rlist:
            spec.extra["regions"] = "; ".join(
                f"{segment_name(str(r.get('name', '')), str(r.get('hemisphere', 'unknown')))} "
                f"{100 * float(r.get('fraction', 0.0)):.0f}%" for r in sorted(rlist, key=lambda r: -r.get("fraction", 0.0)))
        specs.append(spec)
    for s in specs:  # .seg.nrrd headers are ASCII: a dash or accent would be lost on save
        s.name = to_ascii(s.name)
    seen: dict[str, int] = {}
    for s in specs:  # Slicer allows duplicate names, people cannot tell them apart
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name} #{seen[s.name]}"
        else:
            seen[s.name] = 1
    return specs
