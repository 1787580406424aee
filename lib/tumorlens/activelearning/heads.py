"""The base model's text heads (``alignment.pt``, ``text_probe.pt``) carried over to a fine-tuned
version, so a relabel cycle keeps the decision rule and the familiarity check the model was
validated with instead of silently falling back to the plain classifier.

This is only sound when the fine-tune left the encoder alone (``trainable="heads"``): the heads'
projection, prototypes, Tip-Adapter keys and familiarity threshold are all functions of the pooled
encoder features. The fine-tuned classifier layer replaces the head's copy, and the labelled items
join the Tip-Adapter cache as new keys: adding labelled examples to the cache is how Tip-Adapter
learns from a few new cases without retraining the encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tumorlens.alignment.api import ALIGNMENT_FILE, PROBE_FILE, load_alignment, load_probe
from tumorlens.alignment.features import checkpoint_sha, extract_features
from tumorlens.alignment.head import AlignedHead, classifier_layer
from tumorlens.models.registry import LoadedModel

# keys are stored in fp16: the same image's features come back at cosine > 0.9999, distinct slices < 0.999
SAME_IMAGE_COSINE = 0.9995


def same_encoder(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def _updated(head: AlignedHead, net: nn.Module, feats: np.ndarray | None, labels: np.ndarray | None) -> AlignedHead:
    st = head.state()  # a private copy: the serving model's head is shared and read-only
    lin = classifier_layer(net)
    st["classifier"] = {"weight": lin.weight.detach().float().clone(), "bias": lin.bias.detach().float().clone()}
    added = relabelled = 0
    if st.get("cache") and feats is not None and len(feats):
        c = st["cache"]
        keys, ys = c["keys"].float(), c["labels"].long().clone()
        new = torch.nn.functional.normalize(torch.as_tensor(feats, dtype=torch.float32) - c["mean"].float(), dim=-1)
        y_new = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        # an image that is already a key (an earlier relabel cycle, or a training image) takes the new label
        best, j = (new @ keys.T).max(1)
        same = best >= SAME_IMAGE_COSINE
        relabelled = int((ys[j[same]] != y_new[same]).sum())
        ys[j[same]] = y_new[same]
        c["keys"] = torch.cat([keys, new[~same]]).half()
        c["labels"] = torch.cat([ys, y_new[~same]])
        added = int((~same).sum())
    st["meta"] = dict(st.get("meta") or {}, carried_from=st.get("meta", {}).get("checkpoint_sha"), cache_added=added,
                      cache_relabelled=relabelled)
    return AlignedHead.from_state(st)


def cache_keys_added(heads: dict[str, AlignedHead]) -> int:
    h = heads.get(ALIGNMENT_FILE)
    return int(h.meta.get("cache_added", 0)) if h is not None else 0


def carried_heads(base: LoadedModel, net: nn.Module, images: np.ndarray, labels: np.ndarray) -> dict[str, AlignedHead]:
    """``{file name: head}`` for the fine-tuned ``net``; empty when the encoder changed (the heads no
    longer describe its features) or the base model has none. ``images`` uint8 [N, S, S], ``labels`` [N]."""
    if not same_encoder(base.net, net):
        return {}
    heads = {ALIGNMENT_FILE: load_alignment(base), PROBE_FILE: load_probe(base, fit_if_missing=False)}
    heads = {k: h for k, h in heads.items() if h is not None}
    if not heads:
        return {}
    feats = extract_features(net, images)[0] if len(images) else None
    return {name: _updated(h, net, feats if name == ALIGNMENT_FILE else None, np.asarray(labels))
            for name, h in heads.items()}


def write_heads(heads: dict[str, AlignedHead], folder: Path, version: str) -> None:
    """Save the heads beside ``folder``'s checkpoint, stamped with its digest (``load_alignment``
    ignores a head stamped for other weights)."""
    sha = checkpoint_sha(folder)
    for name, head in heads.items():
        head.meta = dict(head.meta, checkpoint_sha=sha, model_version=version)
        head.save(Path(folder) / name)
