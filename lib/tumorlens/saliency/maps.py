"""Saliency maps of whole images: 2D slices directly, volumes slice-wise over axial slices.

Inputs are prepared exactly as :class:`tumorlens.inference.Predictor` prepares them (same
normalisation, same slice selection), and maps come back as float32 MetaTensors in [0, 1] on the
input's own grid and affine, so a map lands on the image wherever it is displayed. Every map is
smoothed at network resolution by a Gaussian of half its layer's stride (``SMOOTH_STRIDES``) before
it is resized to the input.

Volumes: one target class for the whole volume (its most probable tumour class), maps of all
brain slices stacked and scaled by the volume's maximum (a slice with weak evidence stays dim).
ScoreCAM (Cluster-ScoreCAM: 128 masked forwards) still costs ~2 s per slice, so for volumes it runs only on the slices with the
highest tumour probability (those that decide the volume's class, see
``aggregate_slice_probabilities``); other slices get 0 and a note says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from torch.nn import functional as F

from tumorlens.data.normalize import normalize_intensity
from tumorlens.data.readers import IMAGE_META_KEYS, image_array, is_volume
from tumorlens.errors import InvalidInputError
from tumorlens.inference import (
    display_foreground,
    display_to_volume,
    framed_inputs,
    map_on_slice,
    maps_from_frame,
    prepare_slice,
    slice_back,
    slice_display,
    volume_frame,
    volume_to_display,
)
from tumorlens.labels import CLASS_NAMES, TUMOUR_CLASSES
from tumorlens.models.registry import LoadedModel, load_model
from tumorlens.saliency.cam import GRAD_METHODS, METHODS, grad_cams, score_cam
from tumorlens.saliency.threshold import brain_mask

SCORECAM_MASS = None  # every non-zero channel (then clustered); a share like 0.95 ranks channels first
SCORECAM_CLUSTERS = 128  # Cluster-ScoreCAM masks: 12-14x faster than plain, map corr >= 0.996 (bench/saliency.py)
SCORECAM_SLICE_FRACTION = 0.1
# A CAM is native to its layer's grid (16x16 for the shipped model): bilinear upsampling leaves its
# maximum on a grid point and its iso-lines blocky. A Gaussian of half a grid cell (sigma = stride / 2)
# puts the maximum at the centre of the salient mass instead. Chosen on the grouped validation split
# (488 tumour images, cycle-3 model, Grad-CAM pointing game): sigma 0 -> 0.598, stride/4 -> 0.647,
# stride/2 -> 0.664, stride -> 0.625, 1.5 strides -> 0.545.
SMOOTH_STRIDES = 0.5


@dataclass
class SaliencyMaps:
    maps: dict[str, MetaTensor]  # method -> float32 [1, *spatial] in [0, 1], input grid/affine
    target: str  # class explained
    brain: np.ndarray  # bool, spatial shape of the input
    notes: list[str] = field(default_factory=list)
    net_maps: dict[str, np.ndarray] = field(default_factory=dict)  # 2D only: maps at network resolution
    net_input: torch.Tensor | None = None  # 2D only: [1, 1, S, S]


def check_methods(methods) -> tuple[str, ...]:
    """``methods`` as a tuple without repeats: one name ("gradcam") or a sequence of names."""
    methods = tuple(dict.fromkeys((methods,) if isinstance(methods, str) else methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown saliency method(s) {bad}; choose from {', '.join(METHODS)}")
    return methods


def tumour_target(probabilities: dict[str, float]) -> str:
    """The class to explain: the most probable tumour class (a 'no tumour' map shows no lesion)."""
    return max(TUMOUR_CLASSES, key=lambda c: probabilities.get(c, 0.0))


def _as_model(model) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def _to_meta(arr: np.ndarray, img: MetaTensor) -> MetaTensor:
    meta = {k: v for k, v in img.meta.items() if k in IMAGE_META_KEYS}
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)[None]),
                      affine=img.affine.clone(), meta=meta)


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of 2D maps ``[B, H, W]`` (separable, reflect-padded); ``sigma`` in pixels."""
    if sigma <= 0:
        return maps
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=maps.dtype) / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(maps[:, None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


def _run(net, x: torch.Tensor, target: int, methods, mass: float | None, layer: str | None) -> dict[str, torch.Tensor]:
    """Maps ``[B, S, S]`` at network resolution, smoothed by ``SMOOTH_STRIDES`` of the layer's stride."""
    passes = []
    grad = tuple(m for m in methods if m in GRAD_METHODS)
    if grad:
        passes.append(grad_cams(net, x, target=target, layer=layer, methods=grad))
    if "scorecam" in methods:
        passes.append(score_cam(net, x, target=target, layer=layer, mass=mass, clusters=SCORECAM_CLUSTERS))
    out: dict[str, torch.Tensor] = {}
    for p in passes:
        sigma = SMOOTH_STRIDES * x.shape[-1] / p.grid[-1]
        out.update({m: smooth(r, sigma) for m, r in p.maps.items()})
    return out


def saliency_maps(img: MetaTensor, methods=("gradcampp",), model: LoadedModel | str | None = None, *,
                  target: str | None = None, probabilities: dict[str, float] | None = None,
                  layer: str | None = None, scorecam_mass: float | None = SCORECAM_MASS,
                  batch_size: int = 16) -> SaliencyMaps:
    """Maps for ``methods`` of one image (2D or volume).

    ``target``: class to explain (default: the most probable tumour class, from ``probabilities``
    or from the network itself).
    """
    methods = check_methods(methods)
    lm = _as_model(model)
    if lm.net.training:  # e.g. left so by monai.visualize's hooks on a fresh wrapper: BN/dropout would vary
        lm.net.eval()
    arr = image_array(img, "no saliency")
    if target is not None and target not in CLASS_NAMES:
        raise ValueError(f"unknown target class {target!r}")
    if is_volume(img):
        disp, back = volume_to_display(arr, np.asarray(img.affine, dtype=float))
        if len(disp) == 1:  # a one-slice file is the same 2D slice (as predict decides it), mapped back
            return _image2d(img, disp[0], lm, methods, target, probabilities, layer, scorecam_mass,
                            lambda a: display_to_volume(a[None], back))
        return _volume(img, arr, lm, methods, target, probabilities, layer, scorecam_mass, batch_size)
    shown, back = slice_display(img, arr)  # as predict decides it: as a radiologist sees it
    return _image2d(img, shown, lm, methods, target, probabilities, layer, scorecam_mass,
                    None if back is None else (lambda a: slice_back(a, back)))


def _image2d(img, arr, lm: LoadedModel, methods, target, probabilities, layer, mass,
             back=None) -> SaliencyMaps:
    """Maps of 2D slice ``arr`` as the network reads it; ``back``: puts an array of ``arr``'s grid onto the image's
    stored grid (a one-slice volume's, or a slice with patient geometry stored another way)."""
    x = prepare_slice(arr, lm.image_size)
    if target is None:
        if probabilities is None:
            with torch.no_grad():
                probs = lm.net(x)[0].softmax(1)[0].tolist()
            probabilities = dict(zip(lm.labels, probs, strict=True))
        target = tumour_target(probabilities)
    t = list(lm.labels).index(target)
    raw = _run(lm.net, x, t, methods, mass, layer)
    brain = brain_mask(arr)
    maps, net_maps = {}, {}
    for m, r in raw.items():
        full = np.clip(map_on_slice(r[:, None], arr), 0, None) * brain
        mx = full.max()
        full = full / mx if mx > 0 else full
        maps[m] = _to_meta(full if back is None else back(full), img)
        net_maps[m] = r[0].numpy()
    if back is not None:
        brain = back(brain.astype(np.uint8)) > 0
    return SaliencyMaps(maps, target, brain, [], net_maps, x)


def _volume(img, arr, lm: LoadedModel, methods, target, probabilities, layer, mass, batch_size) -> SaliencyMaps:
    affine = np.asarray(img.affine, dtype=float)
    disp, back = volume_to_display(arr, affine)
    brain_vol = brain_mask(arr)  # in 3D: the head is one connected piece there, not always per slice
    brain_disp = volume_to_display(brain_vol.astype(np.uint8), affine)[0] > 0
    area = brain_disp.reshape(brain_disp.shape[0], -1).mean(1)
    use = np.where(area >= 0.05 * max(area.max(), 1e-9))[0]
    if use.size == 0 or area.max() == 0:
        raise InvalidInputError(img.meta.get("filename_or_obj"), "volume has no brain-like foreground")
    vnorm = normalize_intensity(disp)
    size = lm.image_size
    fg, brain_slices = display_foreground(disp)
    frame = volume_frame(fg[brain_slices])  # the frame predict uses for this volume
    slices = framed_inputs(vnorm[use], frame, size)
    notes: list[str] = []
    # per-slice probabilities: needed for the target and for choosing ScoreCAM's slices
    with torch.no_grad():
        sp = torch.cat([lm.net(slices[i:i + batch_size])[0].softmax(1)
                        for i in range(0, len(use), batch_size)]).numpy()
    if target is None:
        if probabilities is None:
            from tumorlens.inference import aggregate_slice_probabilities

            probabilities = dict(zip(lm.labels, aggregate_slice_probabilities(sp).tolist(), strict=True))
        target = tumour_target(probabilities)
    t = list(lm.labels).index(target)
    out = {m: np.zeros(disp.shape, np.float32) for m in methods}
    grad = tuple(m for m in methods if m in GRAD_METHODS)
    for i in range(0, len(use), batch_size):
        idx = use[i:i + batch_size]
        x = slices[i:i + batch_size]
        if grad:
            for m, r in _run(lm.net, x, t, grad, mass, layer).items():
                out[m][idx] = np.clip(maps_from_frame(r[:, None], frame, disp.shape[1:]), 0, None)
    if "scorecam" in methods:
        k = min(len(use), max(3, int(round(SCORECAM_SLICE_FRACTION * len(use)))))
        top = np.argsort(-(1.0 - sp[:, -1]))[:k]
        for j in top:
            x = slices[j:j + 1]
            r = _run(lm.net, x, t, ("scorecam",), mass, layer)["scorecam"]
            out["scorecam"][use[j]] = np.clip(maps_from_frame(r[:, None], frame, disp.shape[1:])[0], 0, None)
        notes.append(f"ScoreCAM computed on the {k} axial slices with the highest tumour probability; other slices are 0")
    maps = {}
    for m, d in out.items():
        vol = display_to_volume(d * brain_disp, back)
        mx = vol.max()
        maps[m] = _to_meta(vol / mx if mx > 0 else vol, img)
    return SaliencyMaps(maps, target, brain_vol, notes)
