"""Layer statistics: how far an image's features at each encoder stage lie from the training images' — the
familiarity check's second measure (class-conditional Mahalanobis distance per stage, Lee et al., NeurIPS 2018).

Why: the k-NN score (``familiarity``) looks only at the pooled deepest features, and there a picture that is
not a head can land among the training slices: a synthetic abdomen cross-section scored 0.82 against the
threshold 0.79 and was read as meningioma 0.98 with no caution, a CT slice saved as PNG as "no tumour" 0.98.
The earlier stages keep the texture and intensity statistics of anatomy and modality, which such pictures do
not share with brain MRI. Measured on the shipped model (one-off script, 2026-12-02): with the stages at
strides 4-32, every one of 26 non-brain pictures (CT, photographs, micrographs, phantoms, synthetic abdomen,
chest and knee) was flagged, against 5 of them by the k-NN score alone; ``bench/familiarity.py`` gives the
figures for its own inputs.

* per stage ``s`` in ``STAGES``: the stage's features averaged over the image; a mean per class; one shared
  covariance of the class-centred training features, kept as its ``COMPONENTS`` leading principal directions
  plus one variance for the rest (a full 1024-wide covariance from 2,726 images is ill-conditioned, and 4 MB).
* ``d_s`` = the smallest squared Mahalanobis distance to a class mean, divided by its median over the grouped
  validation images (so the stages weigh alike); the **layer score** is the largest ``d_s``.
* threshold: the ``1 - QUANTILE`` quantile of the layer score over the grouped validation split (as the k-NN
  threshold: about 1 % of images like the validation ones are flagged by construction).

The statistics are stored next to the model (``layer_statistics.pt``, written by ``tumorlens familiarity``)
with the checkpoint's digest; statistics of other weights are not used.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STAGES = (1, 2, 3, 4)  # DenseNet121's stages at strides 4, 8, 16, 32 (stage 0 is the stem: too little to tell)
COMPONENTS = 64
QUANTILE = 0.01
DECIMALS = 3  # layer scores and the threshold are recorded, and compared, at this precision
FILE = "layer_statistics.pt"


def unfamiliar_layers(scores, threshold: float) -> np.ndarray:
    """The one flagging rule for layer scores (per image and in summaries): above the threshold, as recorded."""
    return np.round(np.asarray(scores, dtype=np.float64), DECIMALS) > round(float(threshold), DECIMALS)


def pooled_stages(feats: list[torch.Tensor], stages: tuple[int, ...] = STAGES) -> list[np.ndarray]:
    """The encoder's stage outputs [B, C, *spatial] -> per stage [B, C] spatial means (float64)."""
    out = []
    for s in stages:
        f = feats[s].detach().float()
        out.append(f.mean(dim=tuple(range(2, f.ndim))).cpu().numpy().astype(np.float64))
    return out


@torch.no_grad()
def extract_stage_features(net, images: np.ndarray, batch: int = 64, progress: bool = False) -> list[np.ndarray]:
    """Per stage [N, C] pooled features of uint8 [N, S, S] network inputs (as ``load_arrays`` stores them)."""
    from tqdm import tqdm

    net.eval()
    parts: list[list[np.ndarray]] = [[] for _ in STAGES]
    for s in tqdm(range(0, len(images), batch), desc="stage features", disable=not progress, leave=False):
        x = torch.from_numpy(np.asarray(images[s:s + batch])).float()[:, None].div_(255.0)
        for acc, f in zip(parts, pooled_stages(net.encoder(x)), strict=True):
            acc.append(f)
    return [np.concatenate(p) for p in parts]


@dataclass
class LayerStatistics:
    """Per stage: class means [C, D], principal directions [K, D] and their variances [K], the variance left
    over, the validation median of the distance; the layer-score threshold; ``meta`` (checkpoint digest, n)."""

    means: list[np.ndarray]
    directions: list[np.ndarray]
    variances: list[np.ndarray]
    rest: list[float]
    scale: list[float]
    threshold: float
    meta: dict = field(default_factory=dict)

    def distances(self, pooled: list[np.ndarray]) -> np.ndarray:
        """[N, stages] smallest squared Mahalanobis distance to a class mean, in units of the validation median."""
        cols = []
        for f, mu, v, lam, rest, sc in zip(pooled, self.means, self.directions, self.variances, self.rest,
                                           self.scale, strict=True):
            r = np.asarray(f, np.float64)[:, None, :] - mu[None]  # [N, C, D]
            p = r @ v.T  # [N, C, K]
            resid = np.maximum((r ** 2).sum(-1) - (p ** 2).sum(-1), 0.0)
            d = (p ** 2 / lam).sum(-1) + resid / rest
            cols.append(d.min(1) / sc)
        return np.stack(cols, 1)

    def scores(self, pooled: list[np.ndarray]) -> np.ndarray:
        """[N] layer score: the largest stage distance."""
        return self.distances(pooled).max(1)

    def save(self, path: str | Path) -> Path:
        from tumorlens.atomic import atomic_write

        state = {"means": [torch.from_numpy(m) for m in self.means],
                 "directions": [torch.from_numpy(v) for v in self.directions],
                 "variances": [torch.from_numpy(v) for v in self.variances],
                 "rest": list(map(float, self.rest)), "scale": list(map(float, self.scale)),
                 "threshold": float(self.threshold), "meta": dict(self.meta)}
        return atomic_write(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: str | Path) -> LayerStatistics:
        s = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls([m.numpy() for m in s["means"]], [v.numpy() for v in s["directions"]],
                   [v.numpy() for v in s["variances"]], list(s["rest"]), list(s["scale"]), float(s["threshold"]),
                   dict(s["meta"]))


def fit(train: list[np.ndarray], train_y: np.ndarray, val: list[np.ndarray], *, components: int = COMPONENTS,
        quantile: float = QUANTILE) -> LayerStatistics:
    """Statistics from per-stage training features and labels; distances scaled and thresholded on ``val``."""
    train_y = np.asarray(train_y)
    classes = np.unique(train_y)
    if len(val[0]) == 0 or len(train_y) < 2 * len(classes):
        raise ValueError("too few images to fit layer statistics")
    means, dirs, lams, rests = [], [], [], []
    for f in train:
        f = np.asarray(f, np.float64)
        mu = np.stack([f[train_y == c].mean(0) for c in classes])
        cen = f - mu[np.searchsorted(classes, train_y)]
        _u, sv, vt = np.linalg.svd(cen, full_matrices=False)
        var = sv ** 2 / len(cen)
        k = int(min(components, len(var) - 1))
        floor = 1e-6 * float(var[0])
        means.append(mu)
        dirs.append(vt[:k])
        lams.append(np.maximum(var[:k], floor))
        rests.append(max(float(var[k:].mean()), floor))
    stats = LayerStatistics(means, dirs, lams, rests, [1.0] * len(train), 0.0)
    raw = stats.distances(val)
    stats.scale = [float(np.median(raw[:, i])) for i in range(raw.shape[1])]
    score = stats.scores(val)
    stats.threshold = float(np.quantile(score, 1.0 - quantile))
    stats.meta = {"stages": list(STAGES[:len(train)]), "components": int(components), "quantile": float(quantile),
                  "n_train": int(len(train_y)), "n_val": int(len(score)),
                  "validation_median": float(np.median(score))}
    return stats


def fit_for_model(model, *, data_root: str | Path | None = None, progress: bool = True) -> LayerStatistics:
    """Fit on the model's own grouped split (its config's ``data.val_fraction`` and ``seed``, as ``align``)."""
    from tumorlens.alignment.features import checkpoint_sha
    from tumorlens.data.dataset import load_arrays
    from tumorlens.data.manifest import load_manifest
    from tumorlens.data.splits import grouped_split
    from tumorlens.paths import config_data_root

    dc = model.config.get("data", {})
    root = Path(data_root) if data_root else config_data_root(dc.get("root", "../shared/data/brain-mri-2d"))
    manifest = load_manifest(root.resolve())
    train_idx, val_idx = grouped_split(manifest, float(dc.get("val_fraction", 0.2)), int(dc.get("seed", 0)))
    images, _masks, labels = load_arrays(manifest, model.image_size, progress=progress)
    feats = extract_stage_features(model.net, images[np.asarray(train_idx + val_idx)], progress=progress)
    nt = len(train_idx)
    stats = fit([f[:nt] for f in feats], labels[train_idx], [f[nt:] for f in feats])
    stats.meta.update({"checkpoint_sha": checkpoint_sha(model), "model": model.name, "model_version": model.version})
    return stats


_LOADED: dict[tuple, LayerStatistics | None] = {}
_LOCK = threading.Lock()


def load_layer_statistics(model) -> LayerStatistics | None:
    """The statistics stored next to ``model`` (a LoadedModel), or None (absent, or fitted for other weights).

    Loaded once per (statistics file, checkpoint file) version, as the aligned head is: every MONAI Label
    request builds a Predictor, and the weights check hashes the 20 MB checkpoint."""
    from tumorlens.alignment.features import checkpoint_sha
    from tumorlens.atomic import file_version
    from tumorlens.models.registry import CHECKPOINT

    path = Path(model.path) / FILE
    if not path.is_file():
        return None
    key = tuple(file_version(p) for p in (path, Path(model.path) / CHECKPOINT))
    with _LOCK:
        if key not in _LOADED:
            if len(_LOADED) >= 4:
                _LOADED.pop(next(iter(_LOADED)))
            stats = LayerStatistics.load(path)
            if stats.meta.get("checkpoint_sha") != checkpoint_sha(model):
                log.warning("%s was fitted for other weights than %s: not used (run `tumorlens familiarity`)",
                            path, model.path)
                stats = None
            _LOADED[key] = stats
        return _LOADED[key]


def carry_layer_statistics(base, dst_folder: str | Path) -> bool:
    """Copy ``base``'s layer statistics (a LoadedModel) to a version fine-tuned with the encoder frozen, stamped with
    the new checkpoint's digest: they describe the encoder's features alone. True when there were valid ones."""
    from tumorlens.alignment.features import checkpoint_sha

    stats = load_layer_statistics(base)
    if stats is None:
        return False
    stats.meta = dict(stats.meta, checkpoint_sha=checkpoint_sha(Path(dst_folder)), carried_from=stats.meta.get("checkpoint_sha"))
    stats.save(Path(dst_folder) / FILE)
    return True
