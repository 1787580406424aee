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
from lib.infers.base import TumorlensInfer, patient_param
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

        patient = patient_param(request)
        given = request.get("findings")
        if given is not None and patient is not None:
            raise bad_request("params.patient with params.findings: the record's own patient field is used; put the "
                              "context there, or leave params.findings out to explain the image with it")
        if given is not None:
            try:
                # from_dict words each problem by field and message: pydantic's own text quotes the value,
                # and a value refused as an identifier must not come back in the answer (or the log)
                findings = Findings.from_dict(json.loads(given) if isinstance(given, str) else given)
            except ValueError as e:
                problem = getattr(e, "problem", None) or "not JSON"
                raise bad_request(f"params.findings is not a valid findings record: {problem[:400]}") from e
            self.check_same_image(findings, img, request)
            return findings
        method = request.get("method") or PRIMARY
        if method not in ("gradcam", "gradcampp", "scorecam"):
            raise bad_request(f"unknown saliency method {method!r}: gradcam, gradcampp or scorecam")
        model = self.state.model()
        if saliency_available():
            from tumorlens.saliency import explain

            return explain(img, method=method, model=model, patient=patient).findings
        from tumorlens.alignment.api import text_matches
        from tumorlens.findings import build_findings
        from tumorlens.inference import Predictor

        pred = Predictor(model).predict(img)
        matches, why = text_matches(model, img, pred.slice_probabilities, vector=pred.text_vector)
        return build_findings(img, pred.probabilities, masks=[("segmentation_head", pred.mask.numpy()[0])], model=model,
                              patient=patient,
                              notes=["saliency pipeline not installed: no saliency map and no atlas regions",
                                     *pred.extra.get("caveats", []), *([why] if why else [])],
                              familiarity=pred.extra.get("familiarity"), text_matches=matches,
                              window=pred.extra.get("window_classifier"))

    @staticmethod
    def check_same_image(findings, img: MetaTensor, request: dict) -> None:
        """A record of another image would put its report on this one (in a datastore, another patient's):
        the record's file name must be this datastore image's, as the record would name it. An uploaded
        file (``file=`` or a session) has a temporary name, so it is not compared."""
        import tempfile
        from pathlib import Path

        from tumorlens.findings.identifiers import safe_file_name

        src = img.meta.get("filename_or_obj")
        if not src or request.get("session") or Path(str(src)).parent == Path(tempfile.gettempdir()):
            return
        name = safe_file_name(Path(str(src)).name) or "image"
        dims = [int(d) for d in img.shape[1:]]
        if findings.input.file == name and list(findings.input.dims) != dims and findings.input.kind == "image2d":
            raise bad_request(f"params.findings describe an image of {list(findings.input.dims)} pixels, not this one "
                              f"({dims}): ask for the report of the image the record was made from")
        if findings.input.file != name:
            raise bad_request(f"params.findings describe the image {findings.input.file!r}, not this one ({name!r}): "
                              "ask for the report of the image the record was made from, or leave params.findings "
                              "out to explain this image")

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
