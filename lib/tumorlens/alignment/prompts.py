"""Class descriptions (``configs/prompts/*.yaml``) and the ablated variants used to test whether the
text does any work: shuffled, neutralised, or replaced by bare class names."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tumorlens.config import load_yaml
from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES, READABLE
from tumorlens.paths import configs_dir

DEFAULT_PROMPTS = "classes.yaml"
# negation cues, shared with retrieval: before the negated words ("no mass") or after them ("glioma ruled out")
PRE_CUES = (r"without any|without a|without evidence of|without|no evidence of|no signs? of|absence of|"
            r"negative for|free of|shows no|with no|not an?|not|no|sans|ohne")
POST_CUES = r"ruled out|excluded|absent|not seen|not identified|not present|none"
NEGATION = re.compile(rf"\b(?:{POST_CUES}|{PRE_CUES})\b", re.I)

# One generic sentence set, given to every class by the "neutral" ablation: no class information left.
NEUTRAL = (
    "an MRI slice of the human brain",
    "a magnetic resonance image of the head",
    "a grayscale medical image of the brain",
)

Descriptions = dict[str, list[str]]


def prompts_path(name: str | Path | None = None) -> Path:
    p = Path(name) if name else configs_dir() / "prompts" / DEFAULT_PROMPTS
    if not p.is_file() and not p.is_absolute():
        p = configs_dir() / "prompts" / str(name)
    return p


def load_descriptions(path: str | Path | None = None) -> Descriptions:
    """Class -> descriptions, validated: every class of CLASS_NAMES present, non-empty, no extras."""
    p = prompts_path(path)
    data = load_yaml(p)
    classes = data.get("classes")
    if not isinstance(classes, dict):
        raise InvalidInputError(p, "expected a 'classes' mapping of class name -> list of descriptions")
    unknown = sorted(str(c) for c in set(classes) - set(CLASS_NAMES))
    missing = [c for c in CLASS_NAMES if c not in classes]
    if unknown or missing:
        raise InvalidInputError(p, f"classes must be exactly {', '.join(CLASS_NAMES)}"
                                   f" (missing: {missing or 'none'}, unknown: {unknown or 'none'})")
    out: Descriptions = {}
    for c in CLASS_NAMES:
        items = classes[c]
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
            raise InvalidInputError(p, f"class {c!r} needs a non-empty list of non-empty strings")
        out[c] = [s.strip() for s in items]
    return out


def is_negated(text: str) -> bool:
    return NEGATION.search(text) is not None


def descriptions_hash(desc: Descriptions) -> str:
    return hashlib.sha256(json.dumps([[c, desc[c]] for c in CLASS_NAMES]).encode()).hexdigest()[:16]


def ablate(desc: Descriptions, kind: str) -> Descriptions:
    """A variant of ``desc``: ``true`` (unchanged), ``shuffle`` (each class gets the next class's
    descriptions: a derangement), ``neutral`` (every class gets the same generic sentences),
    ``names`` (a single bare sentence naming the class)."""
    if kind == "true":
        return {c: list(desc[c]) for c in CLASS_NAMES}
    if kind == "shuffle":
        n = len(CLASS_NAMES)
        return {c: list(desc[CLASS_NAMES[(i + 1) % n]]) for i, c in enumerate(CLASS_NAMES)}
    if kind == "neutral":
        return {c: list(NEUTRAL) for c in CLASS_NAMES}
    if kind == "names":
        return {c: [f"an MRI of the brain showing {READABLE[c]}"] for c in CLASS_NAMES}
    raise ValueError(f"unknown ablation {kind!r}: true, shuffle, neutral or names")


ABLATIONS = ("true", "names", "shuffle", "neutral")
