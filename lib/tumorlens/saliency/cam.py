"""Class-activation maps on network inputs: Grad-CAM and Grad-CAM++ from one shared pass, ScoreCAM batched.

Grad-CAM and Grad-CAM++ differ only in how they weight the same two tensors (the hooked layer's
activations A and the gradient dY_c/dA), so one forward and one *partial* backward serve both:
``torch.autograd.grad(score, A)`` walks back only from the logit to A (through the classifier
head: ReLU, pooling, linear) instead of through the whole encoder into every parameter, as
``monai.visualize`` does with ``loss.backward()``.

ScoreCAM (Wang et al. 2020) needs no gradient: each channel of A, upsampled and min-max
normalised, masks the input; the target-class probability of each masked input is that channel's
weight. The classifier of these nets sees ReLU(A), so ScoreCAM uses ReLU(A): channels that are all
zero then contribute nothing whatever their weight and are skipped exactly. The masked inputs go
through the classification path only (encoder + classifier, not the segmentation decoder), many
per batch. Ranking (optional, on by default): channels sorted by mean activation, and only those
holding the first ``mass`` (95 %) of the total activation are scored; since every weight is a
probability in [0, 1], the skipped channels can change the map by at most 5 % of its L1 mass.
Clustering (Cluster-ScoreCAM, on by default in ``tumorlens.saliency.maps``): the kept channels'
normalised maps are grouped by k-means and only the centres mask the input; each channel takes
its centre's score. With the shipped model (512 channels of a 16x16 map, ~380 of them non-zero)
128 centres give 12-14x the speed of the plain version at a map correlation >= 0.996.
``bench/saliency.py`` measures the speed-up and the correlation with the full, one-channel-per-
pass version.

Everything here works on tensors ``[B, 1, *spatial]`` already normalised for the network; 2D and
3D networks alike. Image-level maps (MetaTensors on the input grid) are in ``tumorlens.saliency.maps``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

GRAD_METHODS = ("gradcam", "gradcampp")
METHODS = ("gradcam", "gradcampp", "scorecam")


def _unwrap(net: nn.Module) -> nn.Module:
    """The DualHeadNet inside a ``ClassifierView`` (or the net itself)."""
    return getattr(net, "net", net) if not hasattr(net, "cam_layer") else net


def resolve_layer(net: nn.Module, layer: str | None = None) -> nn.Module:
    """The module to hook: ``layer`` (dotted name) or the net's own ``cam_layer``."""
    base = _unwrap(net)
    name = layer or getattr(base, "cam_layer", None)
    if not name:
        raise ValueError("no target layer: pass layer= or use a network with a cam_layer attribute")
    if name.startswith("net.") and not hasattr(base, "net"):
        name = name[4:]
    try:
        return base.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"network has no layer {name!r}") from e


def capture(store: dict, key) -> Callable:
    """A forward hook that records the module's output for the calling thread only.

    A hook sits on a model that several threads may share (a server answering concurrent
    requests): without the thread check, another thread's forward would overwrite this call's
    activations, so concurrent saliency requests would need a global lock.
    """
    owner = threading.get_ident()

    def hook(_m, _i, out) -> None:
        if threading.get_ident() == owner:
            store[key] = out

    return hook


def class_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Classification logits only, skipping the segmentation decoder when the net allows it."""
    base = _unwrap(net)
    if hasattr(base, "encoder") and hasattr(base, "classifier"):
        return base.classifier(base.encoder(x)[-1])
    out = base(x)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class CamPass:
    """What one shared forward+backward gives: raw (unnormalised, >= 0) maps at input resolution."""

    maps: dict[str, torch.Tensor]  # method -> [B, *spatial]
    logits: torch.Tensor  # [B, C]
    seg_logits: torch.Tensor | None  # [B, 1, *spatial] when the net has a segmentation head
    target: torch.Tensor  # [B] class index explained
    grid: tuple[int, ...] = ()  # spatial shape of the (finest) hooked layer: the map's native resolution


def _upsample(m: torch.Tensor, size) -> torch.Tensor:
    """[B, *s] -> [B, *size] (bilinear / trilinear), kept >= 0."""
    mode = "bilinear" if m.ndim == 3 else "trilinear"
    return F.interpolate(m[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0].clamp_min(0)


def weight_gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: channel weights = spatial mean of the gradient."""
    dims = tuple(range(2, acts.ndim))
    return F.relu((grads.mean(dims, keepdim=True) * acts).sum(1))


def weight_gradcampp(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), the closed form with the exponential score.

    With ``Y = exp(S)`` the higher derivatives reduce to powers of dS/dA; the common factor
    exp(S) scales every weight of one image alike, so it is left out (it overflows for large
    logits and the map is normalised later anyway).
    """
    dims = tuple(range(2, acts.ndim))
    g2 = grads * grads
    g3 = g2 * grads
    denom = 2.0 * g2 + acts.sum(dims, keepdim=True) * g3
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    alpha = g2 / denom
    weights = (alpha * F.relu(grads)).sum(dims, keepdim=True)
    return F.relu((weights * acts).sum(1))


def grad_cams(net: nn.Module, x: torch.Tensor, target: torch.Tensor | int | None = None,
              layer: str | None = None, methods: tuple[str, ...] = GRAD_METHODS) -> CamPass:
    """Grad-CAM and/or Grad-CAM++ for a batch from ONE forward and one partial backward.

    ``target``: class index per sample (default: the predicted class). The forward is the full
    dual-head forward, so the segmentation logits come for free. ``layer`` may name several
    layers joined by "+" (e.g. ``encoder.stages.3+encoder.stages.4``): the gradients of all of
    them come from the same backward, and the map is the geometric mean of their per-image
    normalised maps (the deep layer says where, the finer one sharpens it: a 128 px input gives
    only a 4x4 map at stride 32).
    """
    unknown = set(methods) - set(GRAD_METHODS)
    if unknown:
        raise ValueError(f"grad_cams computes {GRAD_METHODS}, not {sorted(unknown)}")
    base = _unwrap(net)
    names = layer.split("+") if layer else [None]
    modules = [resolve_layer(base, n) for n in names]
    store: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(capture(store, i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            xin = x.detach().requires_grad_(True)  # guarantees a graph even with frozen weights
            out = base(xin)
            logits, seg = (out if isinstance(out, tuple) else (out, None))
            acts = [store[i] for i in range(len(modules))]
            tgt = _targets(target, logits)
            score = logits.gather(1, tgt[:, None]).sum()  # samples are independent in eval mode
            grads = torch.autograd.grad(score, acts)
    finally:
        for h in handles:
            h.remove()
    size = x.shape[2:]
    weighting = {"gradcam": weight_gradcam, "gradcampp": weight_gradcampp}
    maps = {}
    for m in methods:
        per_layer = [_upsample(weighting[m](a.detach(), g.detach()), size) for a, g in zip(acts, grads, strict=True)]
        if len(per_layer) == 1:
            maps[m] = per_layer[0]
        else:
            maps[m] = torch.stack([normalise(p) for p in per_layer]).prod(0) ** (1.0 / len(per_layer))
    grid = max((tuple(a.shape[2:]) for a in acts), key=lambda g: g[0])
    return CamPass(maps, logits.detach(), None if seg is None else seg.detach(), tgt, grid)


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, dtype=torch.long)
    return t.expand(logits.shape[0]).clone() if t.ndim == 0 else t


@torch.no_grad()
def score_cam(net: nn.Module, x: torch.Tensor, target: torch.Tensor | int | None = None,
              layer: str | None = None, mass: float | None = 0.95, top_k: int | None = None,
              batch_size: int = 64, clusters: int | None = None) -> CamPass:
    """Batched ScoreCAM; channels ranked by mean activation, keeping ``mass`` of the total
    activation (``None``: every non-zero channel) and at most ``top_k`` of them. ``clusters``:
    score only that many masks - the k-means centres of the kept channels' normalised maps, each
    channel weighted by its centre's score (Cluster-ScoreCAM): hundreds of channels
    are near-copies of a few patterns. With several "+"-joined layers, the last one is used."""
    base = _unwrap(net)
    module = resolve_layer(base, layer.split("+")[-1] if layer else None)
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(capture(store, "a"))
    try:
        logits = class_logits(base, x)
        acts = F.relu(store["a"])
    finally:
        handle.remove()
    tgt = _targets(target, logits)
    size = x.shape[2:]
    maps = []
    for b in range(x.shape[0]):
        a = acts[b]  # [K, *s]
        idx = select_channels(a, mass, top_k)
        if clusters is not None and idx.numel() > clusters:
            centres, member = cluster_channels(a[idx], clusters)
            weights = _channel_scores(base, x[b], centres, int(tgt[b]), size, batch_size)[member]
        else:
            weights = _channel_scores(base, x[b], a[idx], int(tgt[b]), size, batch_size)
        cam = F.relu((weights.view(-1, *([1] * (a.ndim - 1))) * a[idx]).sum(0))
        maps.append(cam)
    cams = _upsample(torch.stack(maps), size)
    return CamPass({"scorecam": cams}, logits, None, tgt, tuple(acts.shape[2:]))


def select_channels(a: torch.Tensor, mass: float | None = 0.95, top_k: int | None = None) -> torch.Tensor:
    """Indices of the non-zero channels of ReLU activations ``a`` [K, *s], largest mean first,
    holding ``mass`` of the total activation (all non-zero ones when ``mass`` is None)."""
    s = a.flatten(1).sum(1)
    order = torch.argsort(s, descending=True)
    n = int((s > 0).sum())
    if mass is not None and n > 0:
        cum = torch.cumsum(s[order], 0) / s.sum()
        n = min(n, int((cum < mass).sum()) + 1)
    if top_k is not None:
        n = min(n, int(top_k))
    return order[:max(n, 1)]


def cluster_channels(a: torch.Tensor, k: int, iterations: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (deterministic farthest-point start) of the min-max normalised channel maps ``a``
    [n, *s]: (centres [k, *s], the centre of each channel [n]). Constant channels form their own
    centre (all zero), which ScoreCAM scores 0 as before."""
    flat = a.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    pts = (flat - lo) / (hi - lo).clamp_min(1e-8)
    k = min(k, pts.shape[0])
    chosen = [int(torch.argmax(flat.sum(1)))]  # the strongest channel first, then the farthest points
    dist = torch.cdist(pts, pts[chosen]).min(1).values
    for _ in range(k - 1):
        chosen.append(int(torch.argmax(dist)))
        dist = torch.minimum(dist, torch.cdist(pts, pts[chosen[-1:]])[:, 0])
    centres = pts[chosen].clone()
    for _ in range(iterations):
        member = torch.cdist(pts, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, member, pts)
        counts = torch.bincount(member, minlength=k).to(pts.dtype)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        if torch.allclose(moved, centres):
            break
        centres = moved
    member = torch.cdist(pts, centres).argmin(1)
    return centres.view(k, *a.shape[1:]), member


def _channel_masks(a: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsampled, min-max normalised channel maps [k, *size] and which ones vary at all."""
    mode = "bilinear" if a.ndim == 3 else "trilinear"
    up = F.interpolate(a[None], size=tuple(size), mode=mode, align_corners=False)[0]
    flat = up.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    valid = (hi - lo) > 1e-8
    scale = torch.where(valid, hi - lo, torch.ones_like(hi))
    shape = (-1,) + (1,) * (up.ndim - 1)
    return (up - lo.view(shape)) / scale.view(shape), valid


def _channel_scores(net: nn.Module, x1: torch.Tensor, a: torch.Tensor, target: int, size, batch_size: int) -> torch.Tensor:
    """Target-class probability of the input masked by each channel (0 for constant channels)."""
    masks, valid = _channel_masks(a, size)
    scores = torch.zeros(a.shape[0], dtype=x1.dtype)
    use = torch.nonzero(valid).flatten()
    for start in range(0, use.numel(), batch_size):
        sel = use[start:start + batch_size]
        masked = x1[None] * masks[sel][:, None]  # [n, 1, *size]
        scores[sel] = class_logits(net, masked).softmax(1)[:, target].to(scores.dtype)
    return scores


@torch.no_grad()
def score_cam_plain(net: nn.Module, x: torch.Tensor, target: int | None = None, layer: str | None = None) -> torch.Tensor:
    """Reference ScoreCAM for ONE image: every channel, one full forward per channel (for the benchmark)."""
    base = _unwrap(net)
    module = resolve_layer(base, layer)
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(capture(store, "a"))
    try:
        logits, _ = base(x[:1])
        a = F.relu(store["a"][0])
    finally:
        handle.remove()
    tgt = int(logits.argmax(1)[0]) if target is None else int(target)
    size = x.shape[2:]
    mode = "bilinear" if a.ndim == 3 else "trilinear"
    weights = torch.zeros(a.shape[0])
    for c in range(a.shape[0]):
        m = F.interpolate(a[c][None, None], size=tuple(size), mode=mode, align_corners=False)[0]
        lo, hi = m.min(), m.max()
        if hi - lo <= 1e-8:
            continue
        out = base(x[:1] * ((m - lo) / (hi - lo))[None])[0]  # the full dual-head forward, as a plain caller would
        weights[c] = out.softmax(1)[0, tgt]
    cam = F.relu((weights.view(-1, *([1] * (a.ndim - 1))) * a).sum(0))
    return _upsample(cam[None], size)[0]


def normalise(m: torch.Tensor) -> torch.Tensor:
    """Scale each map of a batch to [0, 1] by its maximum (an all-zero map stays zero)."""
    flat = m.flatten(1)
    mx = flat.max(1).values.clamp_min(1e-12)
    return m / mx.view(-1, *([1] * (m.ndim - 1)))
