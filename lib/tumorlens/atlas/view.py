"""Which plane a 2D slice was cut in (axial / coronal / sagittal), learnt from labelled slices.

Why: template matching alone picks the right plane for only 30 % of dev JPEGs (bench/registration.py
--slices): a CE-T1 slice with its skull correlates with brain-only T1 template slices of every plane
about equally (best NCCs 0.55-0.85 in all three). The plane, though, is plain to see from the head's
outline and the gross anatomy, and the dev manifest labels it (``view``). A multinomial logistic
regression on a small head-centred thumbnail plus three outline numbers learns it in seconds; placement
then searches positions in the predicted plane only and carries the plane probability into its
confidence. The template's own slices (brain only, T1 and inverted contrast) join the training data, so
skull-stripped slices are read right too. Trained with ``tumorlens train-view`` on the grouped training split (never validation);
the weights (about 300 kB of plain arrays) ship in ``models/slice-view/``.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tumorlens.errors import InvalidInputError, ModelNotFoundError
from tumorlens.paths import models_dir

PLANES = ("axial", "coronal", "sagittal")
THUMB = 24  # thumbnail side (pixels) of the head's square frame
HIDDEN = 128  # one hidden layer: a linear model cannot serve skull-on and brain-only slices at once
ALPHA_GRID = (0.3, 1.0, 3.0)  # L2 strengths tried by grouped 3-fold CV on the training part
VIEW_MODEL = "slice-view"  # folder under models/


def view_features(x: np.ndarray, head: np.ndarray) -> np.ndarray | None:
    """Features of a normalised slice ``x`` and its head mask: the head's square frame at THUMB px
    (z-scored) and its outline (box aspect, box fill, head share of the image). None if no head."""
    from tumorlens.atlas.placement import _square_box, _to_frame, _zscore

    box = _square_box(head)
    if box is None:
        return None
    rows = np.flatnonzero(head.any(1))
    cols = np.flatnonzero(head.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    thumb = _zscore(_to_frame(x * head, box, n=THUMB))
    shape = np.array([np.log(h / w), head.sum() / (h * w), head.mean()], dtype=np.float32)
    return np.concatenate([thumb.ravel(), shape]).astype(np.float32)


@dataclass
class ViewClassifier:
    """Standardise, then a small MLP (ReLU hidden layers) with a softmax over PLANES."""

    mean: np.ndarray
    scale: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]  # (weights [in, out], bias [out]) per layer
    card: dict

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        h = (np.atleast_2d(features) - self.mean) / self.scale
        for k, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if k < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        h = h - h.max(1, keepdims=True)
        p = np.exp(h)
        return p / p.sum(1, keepdims=True)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "scale": self.scale}
        for k, (w, b) in enumerate(self.layers):
            arrays[f"w{k}"], arrays[f"b{k}"] = w, b
        np.savez(out / "view_classifier.npz", **arrays)
        (out / "card.json").write_text(json.dumps(self.card, indent=2))
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> ViewClassifier:
        d = Path(model_dir)
        f = d / "view_classifier.npz"
        if not f.is_file():
            raise ModelNotFoundError(f"no slice-view classifier at {d} (train one with `tumorlens train-view`)")
        try:
            z = np.load(f, allow_pickle=False)
            n = sum(1 for k in z.files if k.startswith("w"))
            layers = [(z[f"w{k}"], z[f"b{k}"]) for k in range(n)]
            if not layers or layers[-1][0].shape[1] != len(PLANES):
                raise ValueError(f"expected layers ending in {len(PLANES)} outputs")
            card = json.loads((d / "card.json").read_text())
            return cls(z["mean"], z["scale"], layers, card)
        except (OSError, ValueError, KeyError) as e:
            raise InvalidInputError(f, f"unreadable slice-view classifier: {e}") from e


@lru_cache(maxsize=1)
def shipped_view_classifier() -> ViewClassifier | None:
    """The shipped classifier, or None when the installation has none (placement then matches all planes)."""
    d = models_dir() / VIEW_MODEL
    return ViewClassifier.load(d) if (d / "view_classifier.npz").is_file() else None


def predict_view(x: np.ndarray, head: np.ndarray, clf: ViewClassifier | None = None) -> dict[str, float] | None:
    """Plane probabilities of a normalised slice (as ``placement.head_of_slice`` returns it)."""
    clf = clf or shipped_view_classifier()
    f = view_features(x, head)
    if clf is None or f is None:
        return None
    return {p: float(v) for p, v in zip(PLANES, clf.probabilities(f)[0], strict=True)}


def _features_of(paths: list[Path], progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Features of each slice and of its left-right mirror (a mirrored slice is in the same plane)."""
    from tqdm import tqdm

    from tumorlens.atlas.placement import head_of_slice
    from tumorlens.data import read_image

    feats, ok = [], []
    for p in tqdm(paths, desc="view features", unit="img", disable=not progress):
        img = read_image(p).numpy()[0]
        x, head, _ = head_of_slice(img)
        f = view_features(x, head)
        fm = view_features(x[:, ::-1], head[:, ::-1])
        ok.append(f is not None)
        feats.append((f, fm) if f is not None else None)
    dim = next(f[0].shape[0] for f in feats if f is not None)
    out = np.zeros((len(paths), 2, dim), np.float32)
    for i, f in enumerate(feats):
        if f is not None:
            out[i] = np.stack(f)
    return out, np.array(ok)


def template_examples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, planes and groups of the MNI152 template's own slices (every placement candidate, brain
    only as in skull-stripped data), in T1 contrast and inverted (CSF bright, T2-like), each with its mirror.
    Why: the dev slices all keep their skull; without these a skull-stripped slice reads as another plane."""
    from tumorlens.atlas.harvard_oxford import template
    from tumorlens.atlas.placement import candidates, head_of_slice, template_slice

    data = np.asarray(template().data, dtype=np.float32)
    top = float(np.percentile(data[data > 0], 99.5))
    feats, planes, groups = [], [], []
    for c in candidates():
        if c.flipped:  # a mirrored sagittal candidate: mirrors are added below anyway
            continue
        sl = np.clip(template_slice(data, c.plane, c.vox) / top, 0, 1)
        brain = sl > 0.05
        for img in (sl, np.where(brain, 1.1 - sl, 0.0)):
            x, head, _ = head_of_slice(img)
            for xx, hh in ((x, head), (x[:, ::-1], head[:, ::-1])):
                f = view_features(np.ascontiguousarray(xx), np.ascontiguousarray(hh))
                if f is not None:
                    feats.append(f)
                    planes.append(PLANES.index(c.plane))
                    groups.append(f"mni152-{c.plane}-{c.position_mm:g}")
    return np.stack(feats), np.array(planes), np.array(groups)


def train_view_classifier(data_dir: str | Path, val_fraction: float = 0.2, seed: int = 0,
                          default_view: str | None = None, progress: bool = True) -> tuple[ViewClassifier, dict]:
    """Fit on the grouped training split of a manifest with a ``view`` column; report on its validation
    split. The L2 strength is chosen by grouped 3-fold CV inside the training part. ``default_view``
    labels rows whose view is empty (brain-mri-2d: its Br35H rows, all axial per the data README)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GroupKFold
    from sklearn.neural_network import MLPClassifier

    from tumorlens.data.manifest import load_manifest
    from tumorlens.data.splits import training_split

    t0 = time.time()
    manifest = load_manifest(data_dir)
    if default_view is not None and default_view not in PLANES:
        raise ValueError(f"default_view must be one of {PLANES}, got {default_view!r}")
    views = [str(r.extra.get("view") or "").strip().lower() or (default_view or "") for r in manifest.records]
    if not any(str(r.extra.get("view") or "").strip().lower() in PLANES for r in manifest.records):
        raise InvalidInputError(Path(data_dir) / "manifest.csv", "no `view` column with axial/coronal/sagittal values")
    train_idx, val_idx = training_split(manifest, val_fraction, seed)
    train_idx = [i for i in train_idx if views[i] in PLANES]
    val_idx = [i for i in val_idx if views[i] in PLANES]
    paths = [manifest.records[i].image for i in train_idx + val_idx]
    feats, ok = _features_of(paths, progress)
    y_all = np.array([PLANES.index(views[i]) for i in train_idx + val_idx])
    groups_all = np.array([manifest.records[i].group for i in train_idx + val_idx])
    n_tr = len(train_idx)
    tr = np.flatnonzero(ok[:n_tr])
    va = n_tr + np.flatnonzero(ok[n_tr:])
    t_x, t_y, t_g = template_examples()
    x_tr = np.concatenate([feats[tr].reshape(-1, feats.shape[2]), t_x])  # each slice and its mirror + template
    y_tr = np.concatenate([np.repeat(y_all[tr], 2), t_y])
    g_tr = np.concatenate([np.repeat(groups_all[tr], 2), t_g])
    mean = x_tr.mean(0)
    scale = x_tr.std(0) + 1e-6
    z_tr = (x_tr - mean) / scale
    def fit(alpha: float, rows) -> MLPClassifier:
        return MLPClassifier((HIDDEN,), alpha=alpha, max_iter=500, random_state=seed).fit(z_tr[rows], y_tr[rows])

    cv = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for alpha in ALPHA_GRID:
            accs = []
            for a, b in GroupKFold(n_splits=3).split(z_tr, y_tr, g_tr):
                accs.append(float((fit(alpha, a).predict(z_tr[b]) == y_tr[b]).mean()))
            cv[str(alpha)] = float(np.mean(accs))
        best = float(max(ALPHA_GRID, key=lambda a: cv[str(a)]))
        m = fit(best, np.arange(len(y_tr)))
    layers = [(w.astype(np.float32), b.astype(np.float32)) for w, b in zip(m.coefs_, m.intercepts_, strict=True)]
    clf = ViewClassifier(mean.astype(np.float32), scale.astype(np.float32), layers, {})
    p_va = clf.probabilities(feats[va, 0])
    pred = p_va.argmax(1)
    y_va = y_all[va]
    confusion = np.zeros((3, 3), int)
    for t, p in zip(y_va, pred, strict=True):
        confusion[t, p] += 1
    conf = p_va.max(1)
    metrics = {
        "n_train": int(len(tr)), "n_template_examples": int(len(t_y)), "n_val": int(len(va)),
        "val_accuracy": float((pred == y_va).mean()),
        "val_per_view_recall": {PLANES[k]: float((pred[y_va == k] == k).mean()) for k in range(3) if (y_va == k).any()},
        "val_confusion": {"labels": list(PLANES), "matrix": confusion.tolist()},
        "val_share_p_over_0.9": float((conf >= 0.9).mean()),
        "val_accuracy_p_over_0.9": float((pred[conf >= 0.9] == y_va[conf >= 0.9]).mean()) if (conf >= 0.9).any() else None,
        "cv_accuracy_by_alpha": cv, "alpha": best, "hidden": HIDDEN,
    }
    with open(Path(data_dir) / "manifest.csv", "rb") as fh:
        data_hash = hashlib.sha256(fh.read()).hexdigest()[:16]
    clf.card = {
        "name": "slice-view", "planes": list(PLANES), "features": f"{THUMB}x{THUMB} head frame + 3 outline numbers",
        "training_data": "grouped training part of the manifest (+ mirrors) and MNI152 template slices "
                         "(T1 and inverted contrast, + mirrors)",
        "data": {"root": Path(data_dir).name, "manifest_sha256_16": data_hash, "split": "grouped",
                 "val_fraction": val_fraction, "seed": seed, "default_view": default_view},
        "metrics": metrics, "seconds": round(time.time() - t0, 1),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return clf, metrics
