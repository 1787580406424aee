"""Markdown rendering of a report, with its verification status up front (people read the top)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tumorlens.report.facts import READABLE_CLASS

if TYPE_CHECKING:
    from tumorlens.report.chain import ReportResult


def _status(v: dict) -> str:
    if v.get("fell_back") and v.get("supported"):
        # what is delivered is the verified template; the draft's failure is said, not the report's (the Slicer panel
        # says "VERIFIED (template report)" likewise; an outside probe, session 40, read FLAGGED over a verified report)
        if any(not a.get("error") for a in v.get("attempts", [])):
            return ("Verified against the findings (template report): the model's draft failed verification and was "
                    "replaced by the template report built from the findings.")
        return (f"Verified against the findings (template report): the {v.get('backend')} backend gave no draft "
                "(unreachable or unusable), so this is the template report built from the findings.")
    if v.get("fell_back"):
        return "FLAGGED: the model's draft failed verification; this is the template report built from the findings."
    if v.get("flagged"):
        return "FLAGGED: this report failed verification against the findings."
    if v.get("template_fields"):
        return (f"Verified against the findings; the model's {', '.join(v['template_fields'])} failed verification and "
                "the template's stand in its place.")
    if v.get("repaired"):
        return "Verified against the findings (after one repair round)."
    return "Verified against the findings."


def to_markdown(result: ReportResult) -> str:
    r, v = result.report, result.verification
    lines = ["# TumorLens draft MRI report", "",
             "*Automated research output; not a diagnosis. To be reviewed by a radiologist.*", "",
             f"**Verification:** {_status(v)}  ", f"**Backend:** {v.get('backend')}  ",
             f"**Claims checked:** {v.get('checked', {}).get('claims', 0)}", ""]
    if v.get("flag_reason"):
        lines += [f"> {v['flag_reason']}", ""]
    pc = result.facts.patient
    if not pc.is_empty():  # what the report was checked against (checked free of identifiers on the way in)
        given = [f"age {pc.age}" if pc.age is not None else "", f"sex {pc.sex}" if pc.sex else "",
                 f"history: {pc.clinical_history}" if pc.clinical_history else ""]
        lines += [f"**Clinical information (as given):** {'; '.join(x for x in given if x)}", ""]
    lines += ["## Technique", r.technique, "", "## Findings", r.findings, "", "## Impression", r.impression, ""]
    # one per line: atlas names hold commas ("cingulate gyrus, posterior division")
    regions = [f"- {x}" for x in r.regions]
    of = r.regions_of
    if r.regions_not_listed:
        regions.append(f"- and {r.regions_not_listed} more, each under 1 % of the {of} (listed in the findings)")
    heading = ("## Regions of the salient area (where the classifier looked; largest share first)" if of != "lesion"
               else "## Regions (largest share of the lesion first)")
    lines += [heading, *(regions or ["none named"]), "", f"**Laterality{' of the salient area' if of != 'lesion' else ''}:** "
              f"{r.laterality}", ""]
    lines += ["## Differential (classifier probabilities)", "", "| class | probability |", "|---|---|"]
    lines += [f"| {READABLE_CLASS.get(d.diagnosis, d.diagnosis)} | {d.probability:.2f} |" for d in r.differential]
    if r.matched_descriptions:
        lines += ["", "## Closest clinical descriptions (text-aligned model)",
                  "Descriptions of tumour classes that lie nearest the image in the model's text space: they describe "
                  "the classes, not what this image shows.", ""] + [f"- {x}" for x in r.matched_descriptions]
    lines += ["", "## Recommendations"] + [f"- {x}" for x in r.recommendations]
    lines += ["", "## Limitations"] + [f"- {x}" for x in r.limitations]
    problems = v.get("unsupported_claims", []) + v.get("negation_conflicts", [])
    if problems or v.get("missing"):
        lines += ["", "## Verification problems"] + [f"- \"{c['text']}\": {c['reason']}" for c in problems]
        lines += [f"- {m}" for m in v.get("missing", [])]
    rejected = [a for a in v.get("attempts", []) if not a.get("supported")]
    if rejected:
        lines += ["", "## Rejected model drafts"]
        for a in rejected:
            if a.get("error"):
                lines.append(f"- {a['stage']}: {a['error']}")
                continue
            for c in a.get("negation_conflicts", []) + a.get("unsupported_claims", []):
                lines.append(f"- {a['stage']}: \"{c['text']}\": {c['reason']}")
            lines += [f"- {a['stage']}: {m}" for m in a.get("missing", [])]
    return "\n".join(lines) + "\n"
