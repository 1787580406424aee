"""``saliency_gradcam`` / ``saliency_gradcampp`` / ``saliency_scorecam``: the adaptive saliency mask
as a label file, and the findings record (class, uncertainty, masks, atlas regions) in the JSON.

The label file holds one value per atlas region the lesion touches (``label_names`` maps the
region names to those values; without a confident placement it is one "salient area" label: the mask is where
the classifier looked, not the lesion outline, which is the segmentation task's).
With ``{"heatmap": true}`` in the params the label file is the saliency heatmap instead
(float32 in [0, 1]; 0-255 in a PNG).
"""

from __future__ import annotations

import logging

import numpy as np
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.errors import bad_request
from lib.infers.base import TumorlensInfer, flag, patient_param
from lib.state import AppState

logger = logging.getLogger(__name__)
METHODS = {"saliency_gradcam": "gradcam", "saliency_gradcampp": "gradcampp", "saliency_scorecam": "scorecam"}
SALIENT_AREA = "salient area"


def saliency_available() -> bool:
    """The saliency package lands separately: offer the tasks only once it can explain."""
    try:
        import tumorlens.saliency as sal
    except Exception as e:  # noqa: BLE001 - a half-installed package must not stop the server
        logger.warning(f"saliency tasks unavailable: {type(e).__name__}: {e}")
        return False
    return hasattr(sal, "explain")


def region_labelmap(expl, findings: dict) -> tuple[np.ndarray, dict[str, int]]:
    """Per-region label values when the explanation carries a region labelmap, else one lesion label."""
    mask = expl.mask.detach().cpu().numpy()[0].astype(np.uint8)
    names = getattr(expl, "region_names", None)
    regmap = getattr(expl, "region_map", None)
    if regmap is not None and names:
        lab = np.asarray(regmap.detach().cpu().numpy() if hasattr(regmap, "detach") else regmap)
        if lab.ndim == mask.ndim + 1:
            lab = lab[0]
        if lab.shape == mask.shape and int(lab.max(initial=0)) <= len(names) < 256:
            lab = (lab * (mask > 0)).astype(np.uint8)
            present = sorted({int(v) for v in np.unique(lab)} - {0})
            # values 1..N without gaps: 3D Slicer's MONAILabel module gives value v the v-th name (sorted by
            # value), so a region listed but left without voxels would shift every later name by one
            lut = np.zeros(256, np.uint8)
            lut[present] = np.arange(1, len(present) + 1)
            return lut[lab], {str(names[v - 1]): i for i, v in enumerate(present, start=1)}
        logger.warning(f"region map of shape {lab.shape} does not fit the mask {mask.shape}: one salient-area label")
    # one binary salient-area label; the regions it covers are in findings["regions"] (largest share first)
    return (mask > 0).astype(np.uint8), {SALIENT_AREA: 1}


class SaliencyInfer(TumorlensInfer):
    def __init__(self, state: AppState, name: str):
        self.method = METHODS[name]
        super().__init__(state, InferType.SEGMENTATION, {SALIENT_AREA: 1}, 3,
                         f"Explanation by {self.method}: adaptive saliency mask as label (named by atlas region) "
                         "and the findings record (JSON); params {'heatmap': true} returns the heatmap, "
                         "{'with_regions': false} skips the atlas, {'scorecam_mass': m} scores the channels holding m of the activation",
                         config={"heatmap": False, "with_regions": True})

    def is_valid(self) -> bool:
        return saliency_available() and super().is_valid()

    def explain(self, img: MetaTensor, request: dict):
        from tumorlens.saliency import explain

        patient = patient_param(request)
        import inspect

        accepted = inspect.signature(explain).parameters
        kw = {}
        if self.method == "scorecam" and request.get("scorecam_mass") is not None and "scorecam_mass" in accepted:
            try:
                mass = float(request["scorecam_mass"])
            except (TypeError, ValueError) as e:
                raise bad_request(f"scorecam_mass must be a number in (0, 1], got {request['scorecam_mass']!r}") from e
            if not 0.0 < mass <= 1.0:
                raise bad_request(f"scorecam_mass {mass} must be in (0, 1]")
            kw["scorecam_mass"] = mass
        with_regions = flag(request, "with_regions", True)
        return explain(img, method=self.method, model=self.state.model(), with_regions=with_regions,
                       patient=patient, **kw)

    def run(self, img: MetaTensor, request: dict) -> tuple[np.ndarray | None, dict]:
        heatmap = flag(request, "heatmap", False)
        if heatmap and request.get("result_dtype") and str(request.get("result_extension", "")) != ".png":
            # 3D Slicer's MONAILabel module (uint8) and OHIF (uint16) read every answer as a labelmap: a float
            # map in [0, 1] written as integers would show as nothing, without a word
            raise bad_request(f"heatmap: true answers a float map in [0, 1], which a client reading labels as "
                              f"{request['result_dtype']} cannot show; leave out result_dtype (or ask for a .png, "
                              "0-255), or ask for the mask with heatmap: false")
        expl = self.explain(img, request)
        findings = expl.findings.model_dump(mode="json")
        out = {"findings": findings, "method": self.method,
               "model": {"name": self.state.model().name, "version": self.state.model_version()}}
        if heatmap:
            heat = expl.heatmap.detach().cpu().numpy()[0].astype(np.float32)
            out["label_names"] = {"saliency": 1}
            out["heatmap"] = True
            if str(request.get("result_extension", "")) == ".png" or (img.meta.get("kind") == "image2d" and
                                                                       not request.get("result_extension")):
                return np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), out
            return heat, out
        lab, names = region_labelmap(expl, findings)
        out["label_names"] = names
        return lab, out
