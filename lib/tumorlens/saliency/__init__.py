"""Saliency: Grad-CAM / Grad-CAM++ (one shared pass), batched ScoreCAM, adaptive lesion masks,
their evaluation, and ``explain`` (image -> findings record + files)."""

from tumorlens.saliency.cam import METHODS, grad_cams, score_cam
from tumorlens.saliency.explain import Explanation, explain
from tumorlens.saliency.maps import SaliencyMaps, saliency_maps
from tumorlens.saliency.threshold import adaptive_mask, brain_mask

__all__ = [
    "METHODS",
    "Explanation",
    "SaliencyMaps",
    "adaptive_mask",
    "brain_mask",
    "explain",
    "grad_cams",
    "saliency_maps",
    "score_cam",
]
