"""Pooled image features of a trained model over its own grouped split, extracted once and cached
(keyed by the checkpoint's hash), so fitting and measuring the alignment costs seconds, not minutes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tumorlens.alignment.text import cache_dir
from tumorlens.errors import InvalidInputError
from tumorlens.models.registry import CHECKPOINT, LoadedModel
from tumorlens.paths import config_data_root


def checkpoint_sha(model: LoadedModel | str | Path) -> str:
    """Short digest of a model's checkpoint file (a loaded model, or its folder)."""
    folder = Path(model) if isinstance(model, str | Path) else Path(model.path)
    h = hashlib.sha256()
    with open(folder / CHECKPOINT, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(net, images, batch: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features [N, F], classifier logits [N, C]) for uint8 [N, S, S] arrays or float
    tensors [N, 1, S, S] already normalised to [0, 1]."""
    net.eval()
    feats, logits = [], []
    n = len(images)
    lin = net.classifier[-1]
    for s in tqdm(range(0, n, batch), desc="image features", disable=not progress, leave=False):
        chunk = images[s:s + batch]
        if isinstance(chunk, np.ndarray):
            x = torch.from_numpy(chunk).float()
            x = x[:, None].div_(255.0) if x.ndim == 3 else x
        else:
            x = torch.as_tensor(chunk).float()
        if x.ndim != 4 or x.shape[1] != 1:
            raise InvalidInputError(None, f"expected images [N, 1, S, S], got {tuple(x.shape)}")
        f = net.embed(x.as_subclass(torch.Tensor) if hasattr(x, "as_subclass") else x).float()
        feats.append(f)
        logits.append(lin(f))
    if not feats:
        raise InvalidInputError(None, "no images")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def split_features(model: LoadedModel, *, max_images: int | None = None, progress: bool = True,
                   data_root: str | Path | None = None) -> dict:
    """Features of the model's training data on the same grouped split it was trained with
    (``data.val_fraction``, ``data.seed`` from its config). ``max_images`` caps the training part
    (and the validation part at a quarter of it, at least 64) for quick development runs.

    Returns ``train_f, train_y, train_logits, val_f, val_y, val_logits, val_idx, train_idx,
    val_groups, manifest``.
    """
    from tumorlens.data.dataset import cache_key, load_arrays
    from tumorlens.data.manifest import load_manifest
    from tumorlens.data.splits import grouped_split

    dc = model.config.get("data", {})
    root = Path(data_root) if data_root else config_data_root(dc.get("root", "../shared/data/brain-mri-2d"))
    if not root.is_absolute():
        root = root.resolve()
    manifest = load_manifest(root)
    train_idx, val_idx = grouped_split(manifest, float(dc.get("val_fraction", 0.2)), int(dc.get("seed", 0)))
    if max_images:
        rng = np.random.default_rng(0)
        train_idx = sorted(rng.choice(train_idx, min(max_images, len(train_idx)), replace=False).tolist())
        val_idx = sorted(rng.choice(val_idx, min(max(max_images // 4, 64), len(val_idx)), replace=False).tolist())
    size = model.image_size
    # the arrays' key (manifest, folder, each file's size and time), not the manifest bytes alone
    # and the split's own digest: the parts changed when run-linked images were set aside (session 36)
    parts = hashlib.sha256(repr((train_idx, val_idx)).encode()).hexdigest()[:12]
    key = f"{checkpoint_sha(model)}-{cache_key(manifest, size)}-{max_images or 'all'}-{parts}"
    path = cache_dir() / f"features-{key}.npz"
    if path.is_file():
        z = np.load(path)
        out = {k: z[k] for k in z.files}
    else:
        images, _masks, labels = load_arrays(manifest, size, progress=progress)
        idx = np.asarray(train_idx + val_idx)
        torch_threads = torch.get_num_threads()
        f, lo = extract_features(model.net, images[idx], progress=progress)
        torch.set_num_threads(torch_threads)
        nt = len(train_idx)
        out = {"train_f": f[:nt], "train_logits": lo[:nt], "train_y": labels[train_idx],
               "val_f": f[nt:], "val_logits": lo[nt:], "val_y": labels[val_idx],
               "train_idx": np.asarray(train_idx), "val_idx": np.asarray(val_idx)}
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **out)
        tmp.replace(path)
    out["val_groups"] = np.asarray([manifest.records[i].group for i in out["val_idx"]])
    out["manifest"] = manifest
    return out
