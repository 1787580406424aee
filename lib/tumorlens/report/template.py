"""The deterministic report: no model, only sentences built from the facts.

It is both a backend (fast, reproducible) and the fallback when a model's draft fails
verification twice. Every sentence comes from :class:`Facts`, so it states nothing the findings do
not hold (a test checks that it always verifies).
"""

from __future__ import annotations

from tumorlens.report.facts import READABLE_CLASS, Facts
from tumorlens.report.schema import DifferentialItem, RadiologyReport, ReportDraft


def template_draft(f: Facts) -> ReportDraft:
    """The prose fields written from the facts alone."""
    findings = [f.sentence_class(), f.sentence_uncertainty()]
    size = f.sentence_size()
    if size:
        findings.append(size)
    findings.append(f.sentence_location())
    if f.tumour_present:
        where = ""
        if f.regions:
            r = f.regions[0]
            side = f"{r['hemisphere']} " if r["hemisphere"] in ("left", "right") else ""
            # the largest region of a lesion on both sides may lie on the smaller side: not its centre
            phrase = "centred on" if f.laterality in ("left", "right") else "its largest share in"
            if f.regions_from_saliency:  # where the classifier looked, not where the outline is
                lies = "is centred on" if f.laterality in ("left", "right") else "has its largest share in"
                where = f"; the classifier's salient area {lies} the {side}{r['name']}"
            else:
                where = f", {phrase} the {side}{r['name']}"
        elif f.laterality in ("left", "right"):
            where = (f"; the classifier's salient area lies on the {f.laterality} side" if f.regions_from_saliency
                     else f", {f.laterality} side")
        strength = "Most consistent with" if f.top_probability >= 0.5 else "Uncertain; the most likely class is"
        impression = f"{strength} {READABLE_CLASS[f.label]} (probability {f.top_probability:.2f}){where}."
        recs = "Review by a radiologist against the full MRI study and the clinical findings."
    else:
        impression = f"No tumour detected by the classifier (probability of the no-tumour class {f.top_probability:.2f})."
        recs = "Review by a radiologist against the full MRI study; an automated negative result does not exclude disease."
    return ReportDraft(findings=" ".join(findings), impression=impression, recommendations=recs)


def assemble(f: Facts, draft: ReportDraft) -> RadiologyReport:
    """A full report: the draft's prose plus the factual fields copied from the findings."""
    technique = f"Input: {f.sentence_image()}. Analysis: {f.sentence_method()}"
    caution = f.scope_caution()
    if caution and caution in draft.impression:  # a draft that copied it from the template does not get it twice
        caution = None
    recs = [s.strip() for s in draft.recommendations.replace("\n", " ").split(". ") if s.strip()]
    recs = [r if r.endswith((".", "!", "?")) else r + "." for r in recs]
    return RadiologyReport(
        technique=technique,
        findings=draft.findings.strip(),
        impression=" ".join(x for x in (caution, draft.impression.strip()) if x),
        regions=[f"{r['hemisphere']} {r['name']}" if r["hemisphere"] in ("left", "right") else r["name"]
                 for r in f.listed_regions],
        regions_not_listed=len(f.regions) - len(f.listed_regions),
        laterality=f.laterality,
        regions_of="salient area" if f.regions_from_saliency else "lesion",
        differential=[DifferentialItem(diagnosis=c, probability=round(p, 4)) for c, p in f.ranked],
        recommendations=recs,
        limitations=f.limitations(),
        matched_descriptions=[f"{t['description']} ({t['class_name']}, similarity {t['similarity']:.2f})"
                              for t in f.text_matches[:3]],
    )


def template_report(f: Facts) -> RadiologyReport:
    return assemble(f, template_draft(f))
