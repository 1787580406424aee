"""``tumorlens evaluate-reports``: findings -> report for N images, and the figures that compare
report writers (cf. arXiv 2605.06197): share fully supported before and after repair, negation
conflicts, fallback rate, seconds per report, length, readability (Flesch) and lexical diversity.

Findings come from ``tumorlens.saliency.explain`` when that stage is installed, else from the
Predictor (class probabilities + segmentation-head mask) and ``build_findings``. A folder of
``*findings.json`` files is read as it is.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tumorlens.errors import InvalidInputError


def _spread(records: list, n: int) -> list:
    """``n`` records spread over the list and over the classes (round-robin by label)."""
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(r.label, []).append(r)
    for v in by.values():
        step = max(1, len(v) // max(1, n))
        v[:] = v[::step]
    out = []
    while len(out) < n and any(by.values()):
        for k in sorted(by):
            if by[k] and len(out) < n:
                out.append(by[k].pop(0))
    return out


def iter_findings(data_dir: str | Path, n: int, model: str | None = None) -> Iterator[tuple[str, Any]]:
    """(image name, findings record) for up to ``n`` images of a manifest folder or findings files."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InvalidInputError(root, "not a folder")
    files = sorted(root.glob("**/*findings.json"))
    if files and not (root / "manifest.csv").is_file():
        from tumorlens.findings import Findings

        for p in files[:n]:
            yield p.name, Findings.load(p)
        return
    from tumorlens.data import read_image
    from tumorlens.data.manifest import load_manifest

    records = _spread(list(load_manifest(root)), n)
    explain = None
    try:
        from tumorlens.saliency import explain as _explain  # the full pipeline when installed

        explain = _explain
    except ImportError:
        explain = None
    predictor = None
    for rec in records:
        name = rec.image.name
        if explain is not None:
            yield name, explain(rec.image).findings
            continue
        from tumorlens.findings import build_findings
        from tumorlens.inference import Predictor

        predictor = predictor or Predictor(model)
        img = read_image(rec.image)
        pred = predictor.predict(img)
        mask = pred.mask.detach().cpu().numpy()[0]
        from tumorlens.alignment.api import text_matches

        matches, why = text_matches(predictor.model, img, pred.slice_probabilities, vector=pred.text_vector)
        yield name, build_findings(img, pred.probabilities, masks=[("segmentation_head", mask)],
                                   notes=["no atlas placement: the saliency/atlas stage is not installed",
                                          *([why] if why else [])],
                                   model=predictor.model, file=name, familiarity=pred.extra.get("familiarity"),
                                   text_matches=matches, window=pred.extra.get("window_classifier"))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def flesch_reading_ease(text: str) -> float:
    """Flesch reading ease, 206.835 - 1.015 words/sentence - 84.6 syllables/word.

    Syllables come from pyphen's en_US hyphenation dictionary (what textstat falls back to):
    textstat's own English path fetches NLTK's cmudict over the network at run time, which this
    offline package must not do.
    """
    import pyphen

    from tumorlens.report.negation import split_sentences

    words = _words(text)
    if not words:
        return 0.0
    sentences = max(1, len(split_sentences(text)))
    dic = pyphen.Pyphen(lang="en_US")
    syllables = sum(len(dic.positions(w)) + 1 for w in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


def text_stats(text: str) -> dict[str, float]:
    """Length (words), Flesch reading ease and lexical diversity (type-token ratio)."""
    words = _words(text)
    return {"words": len(words), "flesch": round(flesch_reading_ease(text), 2),
            "ttr": round(len(set(words)) / len(words), 4) if words else 0.0}


def evaluate_reports(data_dir: str | Path, backend: str | None = None, n: int = 10, model: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Run the chain on ``n`` images; per-report rows and the summary figures."""
    from tqdm import tqdm

    from tumorlens.report.chain import generate_report

    rows = []
    it = iter_findings(data_dir, n, model)
    bar = tqdm(total=n, desc="reports", unit="report", disable=not progress)
    for name, findings in it:
        t0, c0 = time.perf_counter(), time.process_time()
        res = generate_report(findings, backend=backend)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        v = res.verification
        attempts = v.get("attempts", [])
        text = " ".join([res.report.findings, res.report.impression, *res.report.recommendations])
        before = bool(attempts[0].get("supported")) if attempts else bool(v["supported"])
        rows.append({
            "image": name, "label": res.facts.label, "backend": v["backend"], "seconds": round(dt, 3), "cpu_seconds": round(cpu, 3),
            "supported_first": before, "supported_delivered": bool(v["supported"]),
            "model_supported": bool(v["supported"] and not v["fell_back"]),
            "repaired": bool(v["repaired"]), "fell_back": bool(v["fell_back"]), "flagged": bool(v["flagged"]),
            "template_fields": list(v.get("template_fields", [])) if not v["fell_back"] else [],
            "draft_conflicts": sum(len(a.get("negation_conflicts", [])) for a in attempts),
            "delivered_conflicts": len(v["negation_conflicts"]),
            "draft_unsupported": sum(len(a.get("unsupported_claims", [])) for a in attempts),
            "draft_missing": sum(len(a.get("missing", [])) for a in attempts),
            "errors": [a["error"] for a in attempts if a.get("error")],
            "problems": [f"{a['stage']}: {c['kind']}: {c['text']}" for a in attempts
                         for c in a.get("negation_conflicts", []) + a.get("unsupported_claims", [])]
                        + [f"{a['stage']}: missing: {m}" for a in attempts for m in a.get("missing", [])],
            **text_stats(text),
        })
        bar.update(1)
    bar.close()
    if not rows:
        raise InvalidInputError(data_dir, "no images or findings to report on")
    k = len(rows)

    def share(key: str) -> float:
        return sum(r[key] for r in rows) / k

    summary = {
        "backend": rows[0]["backend"], "n": k,
        "supported_before_repair": share("supported_first"),
        # the model's whole draft verified, at once or after the repair round
        "supported_after_repair": sum(r["supported_first"] or (r["repaired"] and not r["fell_back"]
                                                               and not r["template_fields"]) for r in rows) / k,
        # the model's verified fields delivered with the template's in place of those that failed
        "partly_template_rate": sum(bool(r["template_fields"]) for r in rows) / k,
        "delivered_supported_or_flagged": sum(r["supported_delivered"] or r["flagged"] for r in rows) / k,
        "fallback_rate": share("fell_back"),
        "repair_rate": share("repaired"),
        "draft_negation_conflicts": sum(r["draft_conflicts"] for r in rows),
        "delivered_negation_conflicts_unflagged": sum(r["delivered_conflicts"] for r in rows if not r["flagged"]),
        "seconds_per_report_mean": statistics.mean(r["seconds"] for r in rows),
        "seconds_per_report_median": statistics.median(r["seconds"] for r in rows),
        "seconds_per_report_max": max(r["seconds"] for r in rows),
        "cpu_seconds_per_report_mean": statistics.mean(r["cpu_seconds"] for r in rows),
        "words_mean": statistics.mean(r["words"] for r in rows),
        "flesch_mean": statistics.mean(r["flesch"] for r in rows),
        "lexical_diversity_ttr_mean": statistics.mean(r["ttr"] for r in rows),
        "errors": sum(len(r["errors"]) for r in rows),
    }
    return {"summary": summary, "reports": rows}


def format_summary(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"report evaluation: backend={s['backend']} n={s['n']}"]
    for key, val in s.items():
        if key in ("backend", "n"):
            continue
        lines.append(f"  {key:<42}{val:.3f}" if isinstance(val, float) else f"  {key:<42}{val}")
    return "\n".join(lines)


def write_json(res: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    return path
