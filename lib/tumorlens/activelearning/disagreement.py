"""Where the classifier's evidence (the primary saliency method, Grad-CAM) and the segmentation head disagree.

An image on which the two heads of one network point at different places is one the model has not
understood: labelling it teaches more than labelling an image it already gets right. The score is
``P(tumour) * (1 - Dice(saliency mask, seg mask))``, so tumour-free predictions (where a saliency
map has no lesion to agree with) rank low.
"""

from __future__ import annotations

import numpy as np
from monai.data import MetaTensor

from tumorlens.activelearning.inputs import network_inputs
from tumorlens.inference import SEG_THRESHOLD
from tumorlens.labels import NO_TUMOUR
from tumorlens.models.registry import LoadedModel
from tumorlens.saliency.cam import grad_cams, normalise
from tumorlens.saliency.explain import PRIMARY

SALIENCY_LEVEL = 0.5  # the maps are min-max normalised per image; keep the upper half


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / (sa + sb))


def saliency_seg_disagreement(model: LoadedModel, img: MetaTensor, max_slices: int = 4) -> dict:
    """Disagreement score in [0, 1] of one image (volumes: mean over representative slices)."""
    x = network_inputs(img, model.image_size, max_slices=max_slices)
    net = model.net.eval()
    # the project's shared-pass CAM: one forward gives class, seg and the primary map (per-image normalised)
    cams = grad_cams(net, x, methods=(PRIMARY,))
    probs = cams.logits.softmax(1)
    sal = normalise(cams.maps[PRIMARY]).numpy()
    sal = sal[:, 0] if sal.ndim == 4 else sal
    seg_m = cams.seg_logits.sigmoid().numpy()[:, 0] >= SEG_THRESHOLD
    sal_m = sal >= SALIENCY_LEVEL
    no_idx = list(model.labels).index(NO_TUMOUR) if NO_TUMOUR in model.labels else -1
    p_tumour = 1.0 - probs[:, no_idx].numpy() if no_idx >= 0 else np.ones(len(x))
    dices = np.array([_dice(sal_m[i], seg_m[i]) for i in range(len(x))])
    scores = p_tumour * (1.0 - dices)
    return {
        "score": float(scores.mean()),
        "dice": float(dices.mean()),
        "p_tumour": float(p_tumour.mean()),
        "saliency_fraction": float(sal_m.mean()),
        "seg_fraction": float(seg_m.mean()),
        "slices": int(len(x)),
        "saliency_method": PRIMARY,
    }
