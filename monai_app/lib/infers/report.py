"""``report``: findings -> radiology report through tumorlens' report chain (JSON only).

The findings come from the request (``params.findings``), or are computed from the image with the
saliency pipeline (``params.method``, default Grad-CAM++) first.
"""

from __future__ import annotations

import numpy as np
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.errors import bad_request
from lib.infers.base import TumorlensInfer
from lib.infers.saliency import saliency_available
from lib.state import AppState


def _has_generate() -> bool:
    try:
        import tumorlens.report as r
    except Exception:  # noqa: BLE001 - a half-installed package must not stop the server
        return False
    return hasattr(r, "generate_report")


class ReportInfer(TumorlensInfer):
    def __init__(self, state: AppState):
        super().__init__(state, InferType.CLASSIFICATION, {}, 3,
                         "Structured radiology report from the findings (verified against them); JSON",
                         config={"method": "gradcampp", "backend": None})

    def is_valid(self) -> bool:
        return _has_generate() and saliency_available() and super().is_valid()

    def run(self, img: MetaTensor, request: dict) -> tuple[np.ndarray | None, dict]:
        from tumorlens.report import generate_report

        findings = request.get("findings")
        if findings is None:
            from tumorlens.saliency import explain

            method = request.get("method") or "gradcampp"
            if method not in ("gradcam", "gradcampp", "scorecam"):
                raise bad_request(f"unknown saliency method {method!r}: gradcam, gradcampp or scorecam")
            findings = explain(img, method=method, model=self.state.model()).findings
        res = generate_report(findings, backend=request.get("backend"))
        fd = findings.model_dump(mode="json") if hasattr(findings, "model_dump") else findings
        return None, {"report": res.report.model_dump(mode="json"), "verification": res.verification,
                      "markdown": res.to_markdown(), "findings": fd,
                      "model": {"name": self.state.model().name, "version": self.state.model_version()}}
