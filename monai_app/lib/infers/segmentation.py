"""``segmentation``: the segmentation head's tumour mask as a uint8 label file on the input geometry."""

from __future__ import annotations

import numpy as np
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.base import TumorlensInfer, flag
from lib.state import AppState
from tumorlens.inference import Predictor

TUMOUR_LABEL = {"tumor": 1}


class SegmentationInfer(TumorlensInfer):
    image_only = True  # its refusals are the image's (see TumorlensInfer.image_only)

    def __init__(self, state: AppState):
        super().__init__(state, InferType.SEGMENTATION, dict(TUMOUR_LABEL), 3,
                         "Tumour mask of the dual-head model's segmentation head, its lesion redrawn at the "
                         "image's own resolution by the lesion refiner (label 1 = tumour); 2D slices and volumes "
                         "(slice-wise), on the input's grid; {'largest_cc': true} keeps its largest connected part")

    def run(self, img: MetaTensor, request: dict) -> tuple[np.ndarray | None, dict]:
        model = self.state.model()
        pred = Predictor(model).predict(img)
        mask = pred.mask.detach().cpu().numpy()[0].astype(np.uint8)
        if flag(request, "largest_cc", False):  # MONAI Label's sample apps' option: keep the largest connected part
            from tumorlens.data.normalize import largest_component

            mask = largest_component(mask > 0).astype(np.uint8)
        out = {
            "label": pred.label,
            "probabilities": pred.probabilities,
            "voxels": int(mask.sum()),
            "model": {"name": model.name, "version": self.state.model_version()},
        }
        out.update({k: v for k, v in pred.extra.items() if k != "model"})  # the served version names it
        out["caveats"] = pred.caveats  # the familiarity note too, as `tumorlens predict` prints them
        return mask, out
