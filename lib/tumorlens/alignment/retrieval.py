"""Text-to-image retrieval with and without negation ("MRI with a pituitary tumour" / "MRI without any
tumour"), in the text space the aligned head maps images into.

Two things go wrong with a plain cosine between an image and a query there, and ``query_scores``
handles both (measured on 160 grouped-validation images, 40 per class, 19 queries: mean P@10 0.96):

* Every query shares "an MRI of the brain" with every image, and that shared direction ranks healthy
  images first for any query ("MRI with a glioma": 3 of the top 3 were tumour-free). A query is scored
  against a baseline: ``cos(image, query) - cos(image, generic brain-MRI sentences)``.
* Sentence encoders place a negated sentence next to its affirmative twin. ``parse_negation`` splits a
  query into what it asserts and what it negates (cues before: "no", "without", "negative for",
  "no evidence of", ...; after: "ruled out", "excluded", "absent"; an even number of cues cancels:
  "not without tumour" asserts a tumour). A whole-statement negation ("glioma ruled out", "no evidence
  of a brain tumour") is scored contrastively, ``cos(MRI with no X) - cos(MRI with X)``, which keeps
  only the direction the negation adds; a negated modifier ("pituitary adenoma with no oedema")
  keeps its subject: ``subject score - 0.5 * score(MRI with X)``.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch

from tumorlens.alignment.prompts import POST_CUES, PRE_CUES
from tumorlens.alignment.text import encode_texts
from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES, TUMOUR_CLASSES

ALL_BUT = {c: tuple(x for x in CLASS_NAMES if x != c) for c in CLASS_NAMES}

# (query, negated, relevant classes)
QUERIES: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    ("MRI with a glioma", False, ("glioma",)),
    ("MRI with a meningioma", False, ("meningioma",)),
    ("MRI with a pituitary tumour", False, ("pituitary",)),
    ("brain MRI with a tumour", False, TUMOUR_CLASSES),
    ("enhancing mass in the sellar region", False, ("pituitary",)),
    ("normal brain MRI", False, ("no_tumor",)),
    ("MRI without any tumour", True, ("no_tumor",)),
    ("no evidence of a brain tumour", True, ("no_tumor",)),
    ("brain MRI with no mass", True, ("no_tumor",)),
    ("MRI without a glioma", True, ALL_BUT["glioma"]),
    ("MRI that shows no pituitary tumour", True, ALL_BUT["pituitary"]),
    ("not a meningioma", True, ALL_BUT["meningioma"]),
)

_PRE = re.compile(rf"\b(?:{PRE_CUES})\b")
_POST = re.compile(rf"\b(?:{POST_CUES})\b")
_NEG = re.compile(rf"\b(?:{POST_CUES}|{PRE_CUES})\b", re.I)
# words that say nothing about the class: a negated query made only of these asserts nothing
GENERIC_WORDS = frozenset("mri brain scan image images of the a an with that shows show showing head slice axial "
                          "coronal sagittal t1 t2 flair and there is are this".split())


# rewrites before parsing: "tumour-free" is "no tumour"; "cannot be excluded" / "not ruled out" assert
# what they qualify; "study", "scan", "exam" are the brain MRI itself
_REWRITES = (
    (re.compile(r"\b([a-z]+)-free\b"), r"no \1"),
    (re.compile(r"\b(?:cannot|can ?not|can't|could not|is not|are not|not)\s+(?:be\s+)?(?:excluded|ruled out)\b"), ""),
    (re.compile(r"\b(?:brain\s+)?(?:study|scan|exam|examination)\b"), "brain mri"),
    # the encoder puts "abnormal brain MRI" next to "normal brain MRI": say what is abnormal here
    (re.compile(r"\babnormal(?:\s+brain)?(?:\s+mri)?\b"), "brain mri with a tumour"),
    # the encoder cannot tell "intra-axial" from "extra-axial": both sit next to the meningioma descriptions
    # ("intra-axial mass" 0.65 to them, 0.41 to the glioma ones). Said in plain words, 8 intra-axial
    # phrasings over 160 validation images: P@10 0.59 -> 1.00 ("parenchymal" 0.76, "inside the brain" 0.93)
    (re.compile(r"\bintra-?axial\b"), "within the brain tissue"),
    # "healthy brain" sat next to the pituitary descriptions (5 of 5 top images): it means a normal one
    (re.compile(r"\bhealthy\b"), "normal"),
)
NORMAL_WORDS = frozenset({"normal", "unremarkable", "healthy"})


def _rewrite(q: str) -> str:
    for pat, rep in _REWRITES:
        q = pat.sub(rep, q)
    return re.sub(r"\s+", " ", q).strip(" ,;")


def parse_negation(query: str) -> tuple[str, str | None]:
    """``(asserted part, negated part or None)`` of a query, lower-cased. A negated "normal" ("not a
    normal scan") asserts a brain MRI with a tumour, as "abnormal" does."""
    q = _rewrite(re.sub(r"\s+", " ", query.lower()).strip().rstrip("."))
    neither = re.match(r"(.*?)\bneither\b(.+?)\bnor\b(.+)", q)
    if neither:  # "neither glioma nor meningioma": both negated (it had returned gliomas)
        return neither.group(1).strip(" ,;"), f"{neither.group(2).strip()} or {neither.group(3).strip()}"
    n_cues = len(_NEG.findall(q))
    if n_cues >= 2 and n_cues % 2 == 0:  # "not without tumour": the negations cancel
        return re.sub(r"\s+", " ", _NEG.sub(" ", q)).strip(" ,;"), None
    post = _POST.search(q)
    if post and q[:post.start()].strip(" ,;"):
        return "", q[:post.start()].strip(" ,;")
    pre = _PRE.search(q)
    if pre:
        asserted, negated = q[:pre.start()].strip(" ,;"), q[pre.end():].strip(" ,;") or None
        contrast = re.search(r"\b(?:but|rather|instead)\b", negated or "")
        if contrast:  # "not a meningioma but a pituitary adenoma": the part after "but" is asserted
            asserted = f"{asserted} {negated[contrast.end():]}".strip(" ,;")
            negated = negated[:contrast.start()].strip(" ,;") or None
            if negated is None:
                return asserted, None
        words = set(re.findall(r"[a-z0-9]+", negated or ""))
        if negated and words & NORMAL_WORDS and not (words - NORMAL_WORDS - GENERIC_WORDS) and not has_content(asserted):
            return "brain mri with a tumour", None
        return asserted, negated
    return q, None


def has_content(text: str) -> bool:
    return any(w not in GENERIC_WORDS for w in re.findall(r"[a-z0-9]+", text))


def strip_negation(query: str) -> str:
    """'MRI without any tumour' -> 'MRI with tumour' (the thing being negated)."""
    return re.sub(r"\s+", " ", _NEG.sub("with", query)).strip()


def _metrics(scores: np.ndarray, relevant: np.ndarray, k: int) -> dict:
    order = np.argsort(-scores, kind="stable")
    rel = relevant[order]
    hits = np.cumsum(rel)
    ap = float((hits[rel] / (np.nonzero(rel)[0] + 1)).mean()) if rel.any() else None
    return {"precision_at_k": float(rel[:k].mean()), "average_precision": ap}


def negation_retrieval(text_vectors, labels, k: int = 50, queries=QUERIES) -> dict:
    """Retrieval accuracy (precision@k, mean average precision) for affirmative and negated queries.

    ``text_vectors`` [N, D]: images in text space; ``labels`` [N] class indices.
    """
    t = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text_vectors), dtype=torch.float32), dim=-1).numpy()
    y = np.asarray(labels)
    rows = []
    for q, neg, rel_cls in queries:
        relevant = np.isin(y, [CLASS_NAMES.index(c) for c in rel_cls])
        kk = int(min(k, max(1, relevant.sum())))
        row = {"query": q, "negated": neg, "relevant": list(rel_cls), "k": kk, "n_relevant": int(relevant.sum())}
        row["direct"] = _metrics(query_scores(t, q, negation_aware=False), relevant, kk)
        row["negation_aware"] = _metrics(query_scores(t, q), relevant, kk)
        rows.append(row)

    def summary(sel: list[dict], scorer: str) -> dict:
        # a query with no relevant image in the folder measures nothing: its AP is undefined (null)
        # and it stays out of the means instead of counting as precision 0
        used = [r for r in sel if r["n_relevant"] > 0]
        return {"n_queries": len(sel), "n_scored": len(used),
                "precision_at_k": float(np.mean([r[scorer]["precision_at_k"] for r in used])) if used else None,
                "map": float(np.mean([r[scorer]["average_precision"] for r in used])) if used else None}

    aff = [r for r in rows if not r["negated"]]
    neg = [r for r in rows if r["negated"]]
    return {"k": k, "queries": rows,
            "affirmative": summary(aff, "direct"), "affirmative_baselined": summary(aff, "negation_aware"),
            "negated": {"direct": summary(neg, "direct"), "negation_aware": summary(neg, "negation_aware")}}


def _baseline() -> np.ndarray:
    from tumorlens.alignment.prompts import NEUTRAL

    g = encode_texts(list(NEUTRAL)).mean(0)
    return g / np.linalg.norm(g)


# a query whose best cosine to every class description is below this is about something else: measured on the
# shipped descriptions, clinical queries (typos and negations included) 0.46-0.80; "banana", "a picture of a cat",
# a name, a French query and "stock market prices" 0.11-0.18
RELEVANCE_MIN = 0.3


@lru_cache(maxsize=1)
def _description_vectors() -> np.ndarray:
    from tumorlens.alignment.prompts import load_descriptions

    e = encode_texts([t for items in load_descriptions().values() for t in items])
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def query_relevance(query: str) -> float:
    """The query's best cosine similarity to a class description: how far it speaks the language the image
    vectors were aligned to (a ranking for "banana" is a ranking of nothing)."""
    e = encode_texts([query])[0]
    return float((_description_vectors() @ (e / np.linalg.norm(e))).max())


def query_scores(text_vectors, query: str, negation_aware: bool = True) -> np.ndarray:
    """Score of each image for a free-text query (see the module docstring); ``negation_aware=False``:
    the plain cosine, for comparison."""
    if not query.strip():
        raise InvalidInputError(None, "a query is empty: give the words to search for")
    t = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text_vectors), dtype=torch.float32), dim=-1).numpy()
    if not negation_aware:
        return t @ encode_texts([query])[0]
    g = t @ _baseline()
    asserted, negated = parse_negation(query)
    if negated is None:
        text = asserted or query
        if len(text.split()) == 1:
            text = f"MRI with a {text}"  # a bare word ("meningioma") in the sentence it lives in
        return t @ encode_texts([text])[0] - g
    if has_content(asserted):
        if not re.search(r"\b(?:mri|scan|image|slice|study)\b", asserted):  # "a meningioma" in its sentence
            asserted = f"MRI with {asserted}"
        a, n = encode_texts([asserted, f"MRI with {negated}"])
        return (t @ a - g) - 0.5 * (t @ n - g)
    qn, qp = encode_texts([f"MRI with no {negated}", f"MRI with {negated}"])
    return t @ qn - t @ qp
