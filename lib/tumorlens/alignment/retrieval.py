"""Text-to-image retrieval with and without negation ("MRI with a pituitary tumour" / "MRI without any
tumour"). Sentence encoders place a negated sentence close to its affirmative twin, so negated queries
are scored twice: directly, and negation-aware: ``cos(image, query) - cos(image, query without its
negation cue)`` ("MRI without any tumour" minus "MRI with tumour"), which keeps only the direction the
negation adds."""

from __future__ import annotations

import re

import numpy as np
import torch

from tumorlens.alignment.text import encode_texts
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

_NEG = re.compile(r"\b(without any|without a|without|no evidence of|shows no|with no|not a|not|no|free of)\b", re.I)


def strip_negation(query: str) -> str:
    """'MRI without any tumour' -> 'MRI with tumour' (the thing being negated)."""
    return re.sub(r"\s+", " ", _NEG.sub("with", query)).strip()


def _metrics(scores: np.ndarray, relevant: np.ndarray, k: int) -> dict:
    order = np.argsort(-scores, kind="stable")
    rel = relevant[order]
    hits = np.cumsum(rel)
    ap = float((hits[rel] / (np.nonzero(rel)[0] + 1)).mean()) if rel.any() else float("nan")
    return {"precision_at_k": float(rel[:k].mean()), "average_precision": ap}


def negation_retrieval(text_vectors, labels, k: int = 50, queries=QUERIES) -> dict:
    """Retrieval accuracy (precision@k, mean average precision) for affirmative and negated queries.

    ``text_vectors`` [N, D]: images in text space; ``labels`` [N] class indices.
    """
    t = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text_vectors), dtype=torch.float32), dim=-1).numpy()
    y = np.asarray(labels)
    texts = [q for q, _, _ in queries]
    q_emb = encode_texts(texts)
    pos_emb = encode_texts([strip_negation(q) for q in texts])
    rows = []
    for (q, neg, rel_cls), qe, pe in zip(queries, q_emb, pos_emb, strict=True):
        relevant = np.isin(y, [CLASS_NAMES.index(c) for c in rel_cls])
        kk = int(min(k, max(1, relevant.sum())))
        row = {"query": q, "negated": neg, "relevant": list(rel_cls), "k": kk, "n_relevant": int(relevant.sum())}
        row["direct"] = _metrics(t @ qe, relevant, kk)
        row["negation_aware"] = _metrics(t @ qe - t @ pe, relevant, kk) if neg else row["direct"]
        rows.append(row)

    def summary(sel: list[dict], scorer: str) -> dict:
        return {"n_queries": len(sel),
                "precision_at_k": float(np.mean([r[scorer]["precision_at_k"] for r in sel])),
                "map": float(np.mean([r[scorer]["average_precision"] for r in sel]))}

    aff = [r for r in rows if not r["negated"]]
    neg = [r for r in rows if r["negated"]]
    return {"k": k, "queries": rows,
            "affirmative": summary(aff, "direct"),
            "negated": {"direct": summary(neg, "direct"), "negation_aware": summary(neg, "negation_aware")}}


def query_scores(text_vectors, query: str, negation_aware: bool = True) -> np.ndarray:
    """Similarity of each image to a free-text query; a negated query is scored contrastively
    (``cos(query) - cos(query without its negation)``) unless ``negation_aware`` is False."""
    t = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text_vectors), dtype=torch.float32), dim=-1).numpy()
    if negation_aware and _NEG.search(query):
        q, pos = encode_texts([query, strip_negation(query)])
        return t @ q - t @ pos
    return t @ encode_texts([query])[0]
