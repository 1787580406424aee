"""Format the report answer (report + verification) as Markdown and a one-line status.

The verification status is shown first and never hidden: a report that the verifier could not
fully support must look different in the panel from one it could.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .results import ResponseError, _maybe_json

_SECTION_ORDER = ("findings", "impression", "localization", "localisation", "regions", "uncertainty",
                  "limitations", "recommendations", "disclaimer")


@dataclass
class ReportView:
    """What the widget shows: status line, whether it is fully verified, and the Markdown."""

    status: str
    verified: bool
    markdown: str
    report: dict
    verification: dict


def split_answer(params: dict) -> tuple[dict, dict, str | None]:
    """(report, verification, markdown or None) from a ``report`` infer answer."""
    report = _maybe_json(params.get("report"))
    if report is None and "sections" in params:
        report = params
    if not isinstance(report, dict):
        raise ResponseError("the answer has no 'report' object")
    verification = _maybe_json(params.get("verification")) or {}
    if not isinstance(verification, dict):
        raise ResponseError("'verification' is not a JSON object")
    md = params.get("markdown")
    return report, verification, md if isinstance(md, str) and md.strip() else None


def _claim_text(c: Any) -> str:
    """A claim as the verifier reports it: ``{"text", "reason"}`` dicts, or plain strings."""
    if isinstance(c, dict) and "text" in c:
        return f'"{c["text"]}"' + (f": {c['reason']}" if c.get("reason") else "")
    return c if isinstance(c, str) else json.dumps(c)


def verification_status(v: dict) -> tuple[str, bool]:
    """A readable status and whether the report shown is fully supported by the findings.

    A report with any unsupported claim, conflict or missing item is never called verified, whatever else the
    record says. The template report delivered because the model's draft failed is verified (every claim
    supported) and says it is the template: shown as "FLAGGED" in red, an annotator read a correct report as a
    faulty one (an outside probe, session 39).
    """
    if not v:
        return "NOT VERIFIED: the server returned no verification", False
    unsupported = list(v.get("unsupported_claims") or [])
    conflicts = list(v.get("negation_conflicts") or [])
    missing = list(v.get("missing") or [])
    fell_back = bool(v.get("fell_back"))
    flagged = bool(v.get("flagged")) or fell_back
    checked = v.get("checked")
    if isinstance(checked, dict):
        checked = checked.get("claims")
    clean = bool(v.get("supported")) and not (unsupported or conflicts or missing)
    ok = clean and (not flagged or fell_back)  # the template stood in for a failed draft: itself verified
    bits = []
    if ok and fell_back:
        why = str(v.get("flag_reason") or "the model's draft failed verification")
        bits.append(f"VERIFIED (template report): every claim is supported by the findings; {why}, so the template "
                    "report is shown")
    elif ok:
        bits.append("VERIFIED: every claim is supported by the findings")
    else:
        bits.append("FLAGGED" if flagged else "NOT VERIFIED")
        if unsupported:
            bits.append(f"{len(unsupported)} unsupported claim(s)")
        if conflicts:
            bits.append(f"{len(conflicts)} negation conflict(s)")
        if missing:
            bits.append(f"{len(missing)} missing item(s)")
        if v.get("flag_reason"):
            bits.append(str(v["flag_reason"]))
    if isinstance(checked, (int, float)) and not isinstance(checked, bool):
        bits.append(f"{int(checked)} claim(s) checked")
    if v.get("repaired"):
        bits.append("repaired by the verifier")
    if fell_back and not ok:
        bits.append("fell back to the template report")
    if v.get("backend"):
        bits.append(f"backend: {v['backend']}")
    return "; ".join(bits), ok


def _render_value(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)):
        lines = []
        for item in value:
            if isinstance(item, dict):
                lines.append("- " + "; ".join(f"{k}: {v}" for k, v in item.items()))
            else:
                lines.append(f"- {item}")
        return lines
    if isinstance(value, dict):
        return [f"- **{k}**: {v if not isinstance(v, (dict, list)) else json.dumps(v)}" for k, v in value.items()]
    return [str(value)]


def report_markdown(report: dict, verification: dict, title: str = "TumorLens report") -> str:
    """Markdown with the verification status on top, then the report sections in a fixed order."""
    status, ok = verification_status(verification)
    lines = [f"# {title}", "", f"> **{status}**", ""]
    keys = [k for k in _SECTION_ORDER if k in report] + [k for k in report if k not in _SECTION_ORDER]
    not_listed = report.get("regions_not_listed") or 0  # a count that belongs under the regions, not a section
    for k in keys:
        if k in ("regions_not_listed", "regions_of"):
            continue
        of = report.get("regions_of") or "lesion"  # the salient area when a saliency map made the regions' mask
        body = _render_value(report[k])
        if k == "regions" and not_listed:
            body.append(f"- and {not_listed} more, each under 1 % of the {of} (listed in the findings)")
        if not body:
            continue
        title = k.replace('_', ' ').capitalize()
        if k in ("regions", "laterality") and of != "lesion":
            title += f" of the {of}"
        lines += [f"## {title}", "", *body, ""]
    if not ok:
        claims = verification.get("unsupported_claims") or []
        conflicts = verification.get("negation_conflicts") or []
        if claims or conflicts:
            lines += ["## Verification problems", ""]
            lines += [f"- unsupported: {_claim_text(c)}" for c in claims]
            lines += [f"- negation conflict: {_claim_text(c)}" for c in conflicts]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def report_view(params: dict) -> ReportView:
    """Everything the panel needs from a ``report`` answer."""
    report, verification, md = split_answer(params)
    status, ok = verification_status(verification)
    if md is not None and status not in md:
        md = f"> **{status}**\n\n{md}"
    return ReportView(status=status, verified=ok, markdown=md or report_markdown(report, verification),
                      report=report, verification=verification)


def probabilities_table(probs: dict[str, float]) -> str:
    """Markdown table of class probabilities, most probable first."""
    rows = sorted(probs.items(), key=lambda kv: -kv[1])
    return "\n".join(["| class | probability |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in rows]) + "\n"
