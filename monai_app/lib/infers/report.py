"""``report``: findings -> radiology report through tumorlens' report chain (JSON only).

The findings come from the request (``params.findings``), or are computed from the image with the
saliency pipeline (``params.method``, default Grad-CAM, the command line's primary method: Grad-CAM++'s mask lay
on one or two edge slices of every BraTS volume, and a report from it described a place the tumour is not).
"""

from __future__ import annotations

import json

import numpy as np
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.errors import bad_request
from lib.infers.base import TumorlensInfer
from lib.infers.saliency import saliency_available
from lib.state import AppState

PRIMARY = "gradcam"  # tumorlens.saliency.explain.PRIMARY (imported lazily there: the package may be missing)


def _has_generate() -> bool:
    try:
        import tumorlens.report as r
    except Exception:  # noqa: BLE001 - a half-installed package must not stop the server
        return False
    return hasattr(r, "generate_report")


class ReportInfer(TumorlensInfer):
    returns_label = False  # JSON only

    def __init__(self, state: AppState):
        super().__init__(state, InferType.OTHERS, {}, 3,
                         "Structured radiology report from the findings (verified against them); JSON",
                         config={"method": PRIMARY, "backend": None})

    def is_valid(self) -> bool:
        return _has_generate() and super().is_valid()

    def findings_of(self, img: MetaTensor, request: dict):
        """The request's findings (validated), else explain the image (saliency + atlas when the
        saliency pipeline is installed, otherwise the classifier and segmentation head alone)."""
        from tumorlens.findings import Findings

        given = request.get("findings")
        if given is not None:
            try:
                return Findings.model_validate(json.loads(given) if isinstance(given, str) else given)
            except (ValueError, TypeError) as e:
                raise bad_request(f"params.findings is not a valid findings record: {str(e)[:400]}") from e
        method = request.get("method") or PRIMARY
        if method not in ("gradcam", "gradcampp", "scorecam"):
            raise bad_request(f"unknown saliency method {method!r}: gradcam, gradcampp or scorecam")
        model = self.state.model()
        if saliency_available():
            from tumorlens.saliency import explain

            return explain(img, method=method, model=model).findings
        from tumorlens.alignment.api import text_matches
        from tumorlens.findings import build_findings
        from tumorlens.inference import Predictor

        pred = Predictor(model).predict(img)
        matches, why = text_matches(model, img, pred.slice_probabilities, vector=pred.text_vector)
        return build_findings(img, pred.probabilities, masks=[("segmentation_head", pred.mask.numpy()[0])], model=model,
                              notes=["saliency pipeline not installed: no saliency map and no atlas regions",
                                     *pred.extra.get("caveats", []), *([why] if why else [])],
                              familiarity=pred.extra.get("familiarity"), text_matches=matches,
                              window=pred.extra.get("window_classifier"))

    def run(self, img: MetaTensor, request: dict) -> tuple[np.ndarray | None, dict]:
        from tumorlens.report import generate_report

        backend = request.get("backend")  # checked before the (seconds-long) saliency pipeline runs
        if backend is not None and backend not in ("local", "openai", "ollama", "template"):
            raise bad_request(f"unknown report backend {backend!r}: local, openai, ollama or template")
        findings = self.findings_of(img, request)
        res = generate_report(findings, backend=backend)
        out = json.loads(json.dumps(res.as_dict(), default=str))
        out.update(markdown=res.to_markdown(), findings=findings.model_dump(mode="json"),
                   model={"name": self.state.model().name, "version": self.state.model_version()})
        return None, out
