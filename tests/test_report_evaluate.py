"""``tumorlens evaluate-reports`` on a few real images (template backend: no language model here)."""

from __future__ import annotations

import json
import math

from tumorlens.report.evaluate import evaluate_reports, flesch_reading_ease, text_stats


def test_evaluate_reports_template_on_real_images(dev_rows, subset_factory, tmp_path):
    rows = [r for r in dev_rows if r["label"] == "no_tumor"][:1] + [r for r in dev_rows if r["label"] == "glioma"][:2]
    data = subset_factory(rows)
    res = evaluate_reports(data, backend="template", n=3, progress=False)
    s = res["summary"]
    assert s["n"] == 3 and len(res["reports"]) == 3
    assert s["delivered_supported_or_flagged"] == 1.0
    assert s["delivered_negation_conflicts_unflagged"] == 0
    assert s["fallback_rate"] == 0.0 and s["supported_before_repair"] == 1.0
    assert s["words_mean"] > 20 and 0 < s["lexical_diversity_ttr_mean"] <= 1 and math.isfinite(s["flesch_mean"])
    json.dumps(res)  # serialisable as the CLI writes it


def test_text_stats():
    easy = flesch_reading_ease("The cat sat. The dog ran.")
    hard = flesch_reading_ease("Heterogeneous intraparenchymal abnormalities necessitate multidisciplinary evaluation.")
    assert easy > 90 > 0 > hard
    st = text_stats("left left left right")
    assert st["words"] == 4 and st["ttr"] == 0.5
