"""``classification``: per-class scores of the dual-head model's classifier, JSON only."""

from __future__ import annotations

import numpy as np
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.base import TumorlensInfer
from lib.state import AppState
from tumorlens.inference import Predictor
from tumorlens.labels import CLASS_NAMES


class ClassificationInfer(TumorlensInfer):
    image_only = True  # its refusals are the image's (see TumorlensInfer.image_only)
    returns_label = False  # JSON only

    def __init__(self, state: AppState):
        super().__init__(state, InferType.CLASSIFICATION, {c: i for i, c in enumerate(CLASS_NAMES)}, 3,
                         "Brain MRI tumour class (glioma / meningioma / pituitary / no tumour) with per-class scores (on 2D slices "
                         "the tumour type is re-weighed by the lesion-window classifier); "
                         "2D slices and volumes (slice-wise)")

    def run(self, img: MetaTensor, request: dict) -> tuple[np.ndarray | None, dict]:
        model = self.state.model()
        pred = Predictor(model).predict(img)
        out = {
            "label": pred.label,
            "probabilities": pred.probabilities,
            # the shape MONAI Label's own ClassificationWriter returns, for generic clients
            "prediction": [{"idx": i, "label": c, "score": pred.probabilities[c]} for i, c in enumerate(model.labels)],
            "model": {"name": model.name, "version": self.state.model_version()},
        }
        # decision (aligned / plain), familiarity with the training images ...; the model is named by the served version
        out.update({k: v for k, v in pred.extra.items() if k != "model"})
        out["caveats"] = pred.caveats  # the familiarity note too, as `tumorlens predict` prints them
        if pred.slice_probabilities is not None:
            out["slices_used"] = int(np.isfinite(pred.slice_probabilities[:, 0]).sum())
        return None, out
