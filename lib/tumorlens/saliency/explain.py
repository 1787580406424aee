"""``explain``: one image -> class, saliency map, adaptive lesion mask, atlas regions, findings record.

The classifier and segmentation head come from :class:`tumorlens.inference.Predictor` (one way
to predict); the saliency map explains the most probable *tumour* class. When the classifier
says "no tumour" (p >= 0.5) the saliency mask is left empty, so no region is ever named for a
lesion the model does not report. Regions come from ``tumorlens.atlas.map_regions`` when that
module is installed; otherwise the record says they were not computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from tumorlens.caveats import REGIONS_NOT_REQUESTED
from tumorlens.data import read_image
from tumorlens.data.readers import IMAGE_META_KEYS, is_volume
from tumorlens.errors import InvalidInputError, RegistrationError, TumorlensError
from tumorlens.findings import Findings, build_findings
from tumorlens.labels import NO_TUMOUR
from tumorlens.models.registry import LoadedModel, load_model
from tumorlens.saliency.cam import METHODS
from tumorlens.saliency.maps import check_methods, saliency_maps
from tumorlens.saliency.threshold import RULE, adaptive_mask

logger = logging.getLogger(__name__)
# the default method, and the one whose mask is placed in the atlas when several are asked for: Grad-CAM
# (grouped validation, shipped model: pointing game on 40 tumour images 0.725 vs Grad-CAM++ 0.550, ScoreCAM
# 0.175; on all 488: 0.723 vs 0.578)
PRIMARY = "gradcam"


@dataclass
class Explanation:
    findings: Findings
    mask: MetaTensor  # uint8 saliency lesion mask, input grid/affine
    heatmap: MetaTensor  # float32 [0, 1], input grid/affine (the primary method's)
    seg_mask: MetaTensor  # uint8 segmentation-head mask, input grid/affine
    image: MetaTensor
    method: str
    heatmaps: dict[str, MetaTensor] = field(default_factory=dict)
    masks: dict[str, MetaTensor] = field(default_factory=dict)
    atlas: dict[str, Any] | None = None
    region_map: np.ndarray | None = None  # per-voxel region index (1-based) when the atlas gives one
    region_names: list[str] | None = None
    target: str | None = None  # the class the saliency maps explain (the most probable tumour class)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """findings.json, mask.nii.gz, heatmap.nii.gz, mask.seg.nrrd, overlay.png (+ mni.png for volumes)."""
        from tumorlens.saliency.output import write_explanation

        return write_explanation(self, out_dir)


def _as_image(image: MetaTensor | str | Path) -> MetaTensor:
    if isinstance(image, MetaTensor):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image)
    raise TypeError(f"explain expects a MetaTensor or a path, not {type(image).__name__}")


def _mask_meta(arr: np.ndarray, like: MetaTensor) -> MetaTensor:
    meta = {k: v for k, v in like.meta.items() if k in IMAGE_META_KEYS}
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8)[None]),
                      affine=like.affine.clone(), meta=meta)


def _atlas_regions(img: MetaTensor, mask: MetaTensor) -> tuple[dict | None, list[str]]:
    """``map_regions`` when the atlas module exists; a note instead of regions otherwise."""
    try:
        from tumorlens.atlas import map_regions
    except ImportError as e:
        return None, [f"atlas regions not computed: the atlas module is not available ({e})"]
    try:
        return map_regions(img, mask), []
    except InvalidInputError:
        raise
    except RegistrationError as e:
        # no regions, and a placement that says it failed: "method none, low_confidence false" read as a placement
        # nobody tried on a volume with no brain in it (session 39 audit)
        problem = getattr(e, "problem", None) or str(e)
        failed = {"regions": [], "lesion": {},
                  "placement": {"method": "mni_registration" if is_volume(img) else "template_slice",
                                "confidence": 0.0, "low_confidence": True, "details": {"failed": problem}}}
        return failed, [f"atlas regions not computed: {problem}"]
    except TumorlensError as e:  # a note, never invented regions (nor the file's path)
        return None, [f"atlas regions not computed: {getattr(e, 'problem', None) or e}"]


def explain(image: MetaTensor | str | Path, method: str = PRIMARY, model: LoadedModel | str | None = None, *,
            with_regions: bool = True, patient: dict | None = None, scorecam_mass: float | None = None,
            layer: str | None = None) -> Explanation:
    """Explain one image (2D or volume). ``method``: gradcam, gradcampp, scorecam or "all";
    ``layer``: the hooked layer (default: the network's ``cam_layer``)."""
    from tumorlens.inference import Predictor, check_head

    img = _as_image(image)
    methods = METHODS if method == "all" else check_methods((method,))
    primary = PRIMARY if method == "all" else method
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    # the head check is left to the atlas stage's full registration, or run below when that does not run
    pred = Predictor(lm, head_check=False).predict(img)  # raises InvalidInputError for a constant image
    kw = {} if scorecam_mass is None else {"scorecam_mass": scorecam_mass}
    sal = saliency_maps(img, methods, lm, probabilities=pred.probabilities, layer=layer, **kw)
    notes = list(sal.notes)
    no_tumour = pred.label == NO_TUMOUR and pred.probabilities[NO_TUMOUR] >= 0.5
    if no_tumour:
        notes.append(f"classifier predicts no tumour (p={pred.probabilities[NO_TUMOUR]:.2f}): saliency mask left "
                     f"empty; the heatmap shows the evidence for {sal.target}")
    elif sal.target != pred.label:
        notes.append(f"saliency explains {sal.target}, the most probable tumour class")
    masks, thresholds = {}, {}
    for m, heat in sal.maps.items():
        th = adaptive_mask(heat.numpy()[0], sal.brain)
        binary = np.zeros_like(th.mask) if no_tumour else th.mask
        masks[m] = _mask_meta(binary.astype(np.uint8), img)
        thresholds[m] = th
    mask = masks[primary]
    seg_np = pred.mask.numpy()[0].astype(np.uint8)
    if pred.extra.get("mask_suppressed_by_classifier"):
        seg_np = np.zeros_like(seg_np)
        notes.append("segmentation head mask suppressed: the classifier predicts no tumour")
    seg_mask = _mask_meta(seg_np, img)
    atlas = None
    if not with_regions:
        notes.append(REGIONS_NOT_REQUESTED)
    elif not mask.numpy().any():
        notes.append("saliency mask is empty: no atlas regions")
    else:
        atlas, extra = _atlas_regions(img, mask)
        notes.extend(extra)
        if atlas is not None:
            atlas.setdefault("lesion", {})["mask_source"] = f"saliency:{primary}"
    failed_to_start = bool(atlas and atlas["placement"].get("details", {}).get("failed"))
    if (atlas is None or failed_to_start) and is_volume(img):  # no registration said whether this is a head
        check_head(pred, img)
    notes.extend(pred.extra.get("caveats", []))
    th = thresholds[primary]
    saliency_info = {"method": primary, "percentile": round(th.percentile, 3),
                     "threshold": float(th.threshold) if np.isfinite(th.threshold) else 1.0, "rule": RULE}
    salient = mask.numpy()[0] > 0
    if seg_np.any() and salient.any():
        saliency_info["outline_inside_fraction"] = round(float((salient & (seg_np > 0)).sum() / (seg_np > 0).sum()), 4)
    mask_list = [("segmentation_head", seg_np)] + [(f"saliency:{m}", masks[m].numpy()[0]) for m in methods]
    from tumorlens.alignment.api import text_matches

    matches, why = text_matches(lm, img, pred.slice_probabilities, vector=pred.text_vector)
    if why:
        notes.append(why)
    findings = build_findings(img, pred.probabilities, masks=mask_list, saliency=saliency_info, atlas=atlas,
                              notes=notes, patient=patient, model=lm, familiarity=pred.extra.get("familiarity"),
                              text_matches=matches, window=pred.extra.get("window_classifier"))
    region_map, region_names = None, None
    if atlas is not None and atlas.get("region_map") is not None:  # per-voxel labels, if the atlas offers them
        region_map, region_names = np.asarray(atlas["region_map"]), list(atlas.get("region_names", []))
    return Explanation(findings=findings, mask=mask, heatmap=sal.maps[primary], seg_mask=seg_mask, image=img,
                       method=primary, heatmaps=sal.maps, masks=masks, atlas=atlas,
                       region_map=region_map, region_names=region_names, target=sal.target)
