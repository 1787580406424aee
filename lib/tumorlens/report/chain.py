"""The report chain (langchain LCEL): findings -> prompt -> chat model -> draft -> verifier ->
(one repair round) -> report, or the template report, flagged.

Why this shape: any chat model, from a 135M local one to a large served one, can write fluent
text that contradicts the evidence. So the model writes prose only, the facts are copied from the
findings, every sentence is verified, a failing draft gets exactly one repair round with the
problems fed back, and if that fails too the fields that failed (findings, impression or
recommendations) are replaced by the template's and the whole is verified again; only when that
fails, or every field failed, is the deterministic template delivered and flagged.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tumorlens.atomic import atomic_write_text, ensure_dir
from tumorlens.errors import unreachable
from tumorlens.paths import configs_dir
from tumorlens.report.backends import chat_model, report_config, resolve_backend, structured
from tumorlens.report.facts import READABLE_CLASS, Facts, build_facts
from tumorlens.report.schema import RadiologyReport, ReportDraft
from tumorlens.report.template import assemble, template_report
from tumorlens.report.verify import problems_text, verify_report

MIN_PROSE_CHARS = 20
LOCAL_GENERATION_LOCK = threading.Lock()


def load_prompts(cfg: dict) -> dict[str, str]:
    from tumorlens.config import load_yaml

    p = load_yaml(configs_dir() / cfg.get("prompts", "report_prompts.yaml"))
    return {k: str(p[k]) for k in ("system", "human", "repair")}


def prompt_inputs(f: Facts) -> dict[str, str]:
    """The prompt's variables: fact lines and the sanitised, quoted patient context."""
    from tumorlens.report.template import template_draft

    d = template_draft(f)
    return {"facts": "\n".join(f"- {line}" for line in f.fact_lines()), "patient": f.patient.prompt_block(),
            "draft_findings": d.findings, "draft_impression": d.impression,
            "draft_recommendations": d.recommendations}


def build_prompts(prompts: dict[str, str]):
    from langchain_core.prompts import ChatPromptTemplate

    first = ChatPromptTemplate.from_messages([("system", prompts["system"]), ("human", prompts["human"])])
    repair = ChatPromptTemplate.from_messages(
        [("system", prompts["system"]), ("human", prompts["human"]), ("human", prompts["repair"])])
    return first, repair


# how an impression says that no tumour was found
NO_TUMOUR_SAID = ("no tumour", "no tumor", "no-tumour", "no-tumor", "normal", "tumour-free", "tumor-free", "no evidence",
                  "negative for", "not detect", "did not find", "no tumour was", "no tumor was")


def completeness(report: RadiologyReport, f: Facts) -> list[str]:
    """What a useful report must say: non-empty prose, and the impression names the class."""
    missing = []
    if len(report.findings.strip()) < MIN_PROSE_CHARS:
        missing.append("findings text is empty or too short")
    imp = report.impression.lower()
    if len(imp.strip()) < MIN_PROSE_CHARS // 2:
        missing.append("impression is empty or too short")
    elif f.tumour_present:
        words = {"pituitary": ("pituitary", "adenoma")}.get(f.label, (f.label,))
        if not any(w in imp for w in words):
            missing.append(f"impression does not name the most likely class ({READABLE_CLASS[f.label]})")
    elif not any(w in imp for w in NO_TUMOUR_SAID):
        missing.append("impression does not state that no tumour was found")
    # a draft cut to one clause ("The classifier favours glioma (probability 0.96)") was delivered as verified: the
    # findings must also say how uncertain the call is and, where a lesion was outlined, how large it is
    text = report.findings.lower()
    if not re.search(r"uncertain|entropy|confiden", text):
        missing.append("findings do not state the classifier's uncertainty")
    if f.tumour_present and not f.mask_empty and not re.search(
            r"\d\s*(?:mm2|mm²|mm\^2|cm2|cm²|mm3|mm³|cm3|cm³|ml\b|pixels?\b|voxels?\b)", text):
        missing.append("findings do not give the lesion's size")
    # recommendations that are no recommendation ("This recommendation is not available in the full report.")
    recs = " ".join(report.recommendations).lower()
    # ("clinical" alone had passed a local model's "... while the clinical findings suggest ...", which asks nothing)
    if not re.search(r"\breview|radiologist|correlat", recs) or "not available" in recs:
        missing.append("recommendations do not ask for a radiologist's review against the study")
    return missing


def _verify(report: RadiologyReport, f: Facts) -> dict[str, Any]:
    v = verify_report(report, f)
    v["missing"] = completeness(report, f)
    v["supported"] = bool(v["supported"] and not v["missing"])
    return v


@dataclass
class ReportResult:
    """A delivered report, its verification record, and how it was produced."""

    report: RadiologyReport
    verification: dict[str, Any]
    facts: Facts
    seconds: float = 0.0
    prompt_messages: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "report": self.report.model_dump(),
            "verification": self.verification,
            "patient_context": self.facts.patient.as_dict(),
            # the backend asked, and who wrote the text delivered: a client reading the JSON alone took the
            # template's text for the model's when the backend was unreachable
            "provenance": {"backend": self.verification.get("backend"), "text_by": self.text_by(),
                           "seconds": round(self.seconds, 3),
                           "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "findings_model": self.facts.model_name},
        }

    def text_by(self) -> str:
        """Who wrote the delivered text: the backend, ``template``, or both (the template's fields stood in)."""
        backend, fields = self.verification.get("backend"), set(self.verification.get("template_fields") or ())
        if not fields:
            return str(backend)
        return "template" if fields >= set(DRAFT_FIELDS) else f"{backend} and template"

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def to_markdown(self) -> str:
        from tumorlens.report.render import to_markdown

        return to_markdown(self)

    def write(self, out_dir: str | Path, pictures: list[str | Path] | None = None) -> dict[str, Path]:
        """``report.json`` and ``report.md`` in ``out_dir`` (each written atomically). ``pictures``: the
        explanation's PNGs (``overlay.png``, ``mni.png``), linked from report.md so its reader finds them."""
        import os

        out = ensure_dir(out_dir)
        paths = {"json": out / "report.json", "markdown": out / "report.md"}
        md = self.to_markdown()
        shown = [Path(p) for p in pictures or [] if Path(p).is_file()]
        if shown:
            md = md.rstrip("\n") + "\n\n## Pictures\n\n" + "\n".join(
                f"![{PICTURE_CAPTIONS.get(p.name, p.stem)}]({Path(os.path.relpath(p, out)).as_posix()})  \n"
                f"*{PICTURE_CAPTIONS.get(p.name, p.stem)}*\n" for p in shown)
        for key, text in (("json", self.to_json() + "\n"), ("markdown", md)):
            atomic_write_text(paths[key], text)
        return paths


PICTURE_CAPTIONS = {
    "overlay.png": "The image with the salient area (red: where the classifier looked) and the segmentation head's "
                   "lesion outline (cyan)",
    "mni.png": "The salient area's centroid on the MNI152 template",
}


def _short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def build_chain(backend: str, cfg: dict | None = None, model: Any = None):
    """The LCEL chain ``{"facts": Facts} -> state dict`` for a model backend.

    ``model`` replaces the backend's chat model (tests of the parse/repair path only).
    """
    from langchain_core.runnables import RunnableBranch, RunnableLambda, RunnablePassthrough

    cfg = cfg if cfg is not None else report_config()
    first_prompt, repair_prompt = build_prompts(load_prompts(cfg))
    llm = model if model is not None else structured(chat_model(backend, cfg), ReportDraft, backend, cfg)
    draft_chain = first_prompt | llm
    repair_chain = repair_prompt | llm

    def prepare(state: dict) -> dict:
        f: Facts = state["facts"]
        return {**state, "inputs": prompt_inputs(f), "attempts": []}

    def attempt(chain, stage: str):
        def run(state: dict) -> dict:
            f: Facts = state["facts"]
            inputs = dict(state["inputs"])
            if stage == "repair":
                prev = state.get("draft")
                inputs.update(problems=state.get("problems") or "- the draft could not be read",
                              previous_findings=(prev.findings if prev else "")[:600].replace("{", "(").replace("}", ")"),
                              previous_impression=(prev.impression if prev else "")[:300].replace("{", "(").replace("}", ")"))
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"stage": stage}
            try:
                draft = chain.invoke(inputs)
                if isinstance(draft, dict):
                    draft = ReportDraft.model_validate(draft)
                if draft is None:
                    raise ValueError("the model returned no structured draft")
            except Exception as e:  # noqa: BLE001 - any model/server/parse failure is recorded, then repaired or replaced
                rec.update(error=_short_error(e), supported=False, seconds=round(time.perf_counter() - t0, 3))
                return {**state, "attempts": state["attempts"] + [rec], "ok": False, "draft": None,
                        "unreachable": unreachable(e),
                        "problems": f"- the previous answer could not be used ({_short_error(e)[:120]})"}
            report = assemble(f, draft)
            v = _verify(report, f)
            rec.update(supported=v["supported"], unsupported_claims=v["unsupported_claims"],
                       negation_conflicts=v["negation_conflicts"], missing=v["missing"],
                       draft=draft.model_dump(), seconds=round(time.perf_counter() - t0, 3))
            problems = problems_text(v)
            if v["missing"]:
                problems += "".join(f"\n- {m}" for m in v["missing"])
            return {**state, "attempts": state["attempts"] + [rec], "ok": v["supported"], "draft": draft,
                    "report": report, "verification": v, "problems": problems.strip()}
        return run

    rounds = int(cfg.get("repair_rounds", 1))
    chain = RunnableLambda(prepare) | RunnableLambda(attempt(draft_chain, "draft"))
    for _ in range(rounds):
        chain = chain | RunnableBranch(
            # a server that timed out or could not be reached is not asked again: the template comes at once
            (lambda s: not s["ok"] and not s.get("unreachable"), RunnableLambda(attempt(repair_chain, "repair"))),
            RunnablePassthrough(),
        )
    return chain


def _prompt_messages(f: Facts, cfg: dict) -> list[dict[str, str]]:
    first, _ = build_prompts(load_prompts(cfg))
    return [{"role": m.type, "content": m.content} for m in first.format_messages(**prompt_inputs(f))]


DRAFT_FIELDS = ("findings", "impression", "recommendations")


def _failing_fields(attempt: dict) -> set[str]:
    """The drafted fields an attempt's verification found fault with (``recommendations[1]`` -> ``recommendations``;
    anything else, e.g. a structured field, is returned as it is)."""
    bad = {c["field"].split("[")[0] for c in attempt.get("unsupported_claims", []) + attempt.get("negation_conflicts", [])}
    bad |= {m.split()[0] if m.split()[0] in DRAFT_FIELDS else "findings" for m in attempt.get("missing", [])}
    return bad


def _with_template_fields(f: Facts, attempts: list[dict]):
    """``(report, verification, fields)``: a model draft whose failed fields are the template's, verified as a
    whole, or None. A small model's draft often fails on one field alone (five of 24 pituitary drafts added
    'treatment options' to the recommendations): the rest was verified and is kept. The attempt with the fewest
    failed fields is tried first. Not kept: a draft that contradicts the findings anywhere (a negation conflict,
    as an injected 'there is no tumour' is), and one whose findings and impression both failed (what is left of
    it says nothing)."""
    from tumorlens.report.template import template_draft

    tried = []
    for i, a in enumerate(attempts):
        bad = _failing_fields(a)
        if (a.get("error") or not a.get("draft") or not bad or a.get("negation_conflicts")
                or not bad <= set(DRAFT_FIELDS) or {"findings", "impression"} <= bad):
            continue
        tried.append((len(bad), -i, sorted(bad), a["draft"]))
    if not tried:
        return None
    tpl = template_draft(f).model_dump()
    for _n, _i, bad, draft in sorted(tried):
        try:
            mixed = ReportDraft.model_validate({k: tpl[k] if k in bad else draft[k] for k in DRAFT_FIELDS})
        except ValueError:
            continue
        report = assemble(f, mixed)
        v = _verify(report, f)
        if v["supported"]:
            return report, v, bad
    return None


def generate_report(findings: Any, backend: str | None = None, *, config: dict | None = None,
                    model: Any = None) -> ReportResult:
    """Findings record (``Findings``, dict or path) -> verified :class:`ReportResult`.

    ``backend``: ``local`` | ``openai`` | ``ollama`` | ``template`` (default from
    ``configs/report.yaml`` or ``TUMORLENS_REPORT_BACKEND``).
    """
    t0 = time.perf_counter()
    cfg = config if config is not None else report_config()
    name = resolve_backend(backend, cfg)
    f = build_facts(findings)
    messages = _prompt_messages(f, cfg) if name != "template" else []
    if name == "template":
        report = template_report(f)
        v = _verify(report, f)
        v.update(backend="template", repaired=False, fell_back=False, flagged=not v["supported"], attempts=[],
                 template_fields=[],
                 flag_reason="" if v["supported"] else "the template report failed verification")
        return ReportResult(report, v, f, time.perf_counter() - t0, messages)

    state: dict[str, Any] = {"facts": f, "attempts": [], "ok": False}
    # one llama.cpp context per process is not thread-safe (a server may call this from threads)
    guard = LOCAL_GENERATION_LOCK if name == "local" and model is None else contextlib.nullcontext()
    try:
        with guard:
            state = build_chain(name, cfg, model=model).invoke({"facts": f})
    except Exception as e:  # noqa: BLE001 - e.g. the backend could not be built: deliver the template, flagged
        state["attempts"] = [{"stage": "setup", "error": _short_error(e), "supported": False}]
    attempts = state.get("attempts", [])
    if state.get("ok"):
        v = state["verification"]
        v.update(backend=name, repaired=len(attempts) > 1, fell_back=False, flagged=False, attempts=attempts,
                 template_fields=[], flag_reason="")
        return ReportResult(state["report"], v, f, time.perf_counter() - t0, messages)
    mixed = _with_template_fields(f, attempts)
    if mixed is not None:  # the model's verified fields kept, the template's in place of those that failed
        report, v, fields = mixed
        v.update(backend=name, repaired=len(attempts) > 1, fell_back=False, flagged=False, attempts=attempts,
                 template_fields=fields, flag_reason="")
        return ReportResult(report, v, f, time.perf_counter() - t0, messages)
    # the model's drafts failed: deliver the template, flagged
    report = template_report(f)
    v = _verify(report, f)
    reasons = []
    for a in attempts:
        if a.get("error"):
            reasons.append(f"{a['stage']}: {a['error']}")
        else:
            n = len(a.get("unsupported_claims", [])) + len(a.get("negation_conflicts", [])) + len(a.get("missing", []))
            reasons.append(f"{a['stage']}: {n} problem(s)")
    drafted = [a for a in attempts if not a.get("error")]
    why = ("the model's draft failed verification after repair" if drafted else
           f"the {name} backend gave no draft (unreachable, misconfigured or unparsable output)")
    v.update(backend=name, repaired=len(attempts) > 1 and bool(drafted), fell_back=True, flagged=True,
             attempts=attempts, template_fields=list(DRAFT_FIELDS), flag_reason=f"{why}; template report delivered (" + "; ".join(reasons) + ")")
    return ReportResult(report, v, f, time.perf_counter() - t0, messages)
