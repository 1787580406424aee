"""What other stages call: the text head of a model (aligned adapter if it won, else the plain
model's linear text probe), the semantic margin rate, and the nearest class descriptions."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from tumorlens.alignment.features import checkpoint_sha, extract_features
from tumorlens.alignment.head import AlignedHead
from tumorlens.alignment.margin import margin_rate, semantic_margins
from tumorlens.alignment.text import cache_dir
from tumorlens.atomic import file_version
from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES
from tumorlens.models.registry import CHECKPOINT, LoadedModel, load_model

log = logging.getLogger(__name__)
ALIGNMENT_FILE = "alignment.pt"  # the aligned adapter: written next to the model only if it wins
PROBE_FILE = "text_probe.pt"  # the plain model's linear probe into text space (a measuring instrument)


def _model(model) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def _load_checked(path: Path, model: LoadedModel) -> AlignedHead | None:
    if not path.is_file():
        return None
    head = AlignedHead.load(path)
    want = checkpoint_sha(model)
    if head.meta.get("checkpoint_sha") != want:
        log.warning("%s was fitted for another checkpoint (%s, now %s): ignored", path,
                    head.meta.get("checkpoint_sha"), want)
        return None
    stale = stale_texts(head)
    if stale:
        log.warning("%s: %s", path, stale)
    return head


def stale_texts(head: AlignedHead) -> str | None:
    """Why the head's descriptions are not the active ones (``configs/prompts``), or None.

    A stored head keeps the descriptions it was fitted and validated with: its projection, prototypes
    and tuned weights belong together, so an edited prompt file takes effect when ``tumorlens align``
    refits (and re-validates) the head, not silently half-way."""
    from tumorlens.alignment.prompts import descriptions_hash, load_descriptions
    from tumorlens.alignment.text import encoder_id

    fitted = head.texts.get("key")
    try:
        active = f"{descriptions_hash(load_descriptions())}-{encoder_id()}"
    except InvalidInputError as e:
        return f"the class descriptions cannot be read ({e}); the text head keeps the ones it was fitted with"
    if fitted and fitted != active:
        return (f"the class descriptions changed after the text head was fitted ({fitted[:16]} -> {active[:16]}): "
                "decisions and matched descriptions use the fitted ones until `tumorlens align` refits the head")
    return None


_HEADS: dict[tuple, AlignedHead | None] = {}
_HEADS_LOCK = threading.Lock()


def load_alignment(model=None) -> AlignedHead | None:
    """The aligned adapter stored next to the model, or None (absent, or fitted for other weights).

    Loaded once per (adapter file, checkpoint file) version and shared, read-only: the check hashes the
    20 MB checkpoint, ~20 ms that every MONAI Label request (one Predictor each) would otherwise pay.
    A rewritten adapter or checkpoint (new mtime or size) is loaded afresh."""
    m = _model(model)
    path = Path(m.path) / ALIGNMENT_FILE
    if not path.is_file():
        return None
    key = file_version(path) + file_version(Path(m.path) / CHECKPOINT)
    with _HEADS_LOCK:
        if key not in _HEADS:
            if len(_HEADS) >= 4:
                _HEADS.pop(next(iter(_HEADS)))
            _HEADS[key] = _load_checked(path, m)
        return _HEADS[key]


def decision_prototypes(model=None) -> tuple[np.ndarray, str]:
    """(class prototypes [C, D] unit, the key of their descriptions and encoder) that the model's decisions
    are compared with: the stored aligned head's (the descriptions it was fitted and validated with), else
    the active descriptions' (``configs/prompts``)."""
    head = load_alignment(model)
    if head is not None:
        return head.prototypes.numpy().astype(np.float32), head.texts.get("key")
    from tumorlens.alignment.prompts import load_descriptions
    from tumorlens.alignment.text import build_prototypes

    protos = build_prototypes(load_descriptions())
    return np.asarray(protos["prototypes"], np.float32), protos["key"]


def probe_path(model: LoadedModel) -> Path:
    return Path(model.path) / PROBE_FILE


def load_probe(model=None, *, fit_if_missing: bool = True) -> AlignedHead | None:
    """The plain model's text probe: next to the model, else in the cache, else fitted now from the
    model's training-split features (slow the first time: one pass over the training images)."""
    m = _model(model)
    for p in (probe_path(m), cache_dir() / f"probe-{checkpoint_sha(m)}.pt"):
        head = _load_checked(p, m)
        if head is not None:
            return head
    if not fit_if_missing:
        return None
    from tumorlens.alignment.experiment import fit_probe_head
    from tumorlens.alignment.features import split_features
    from tumorlens.alignment.prompts import load_descriptions
    from tumorlens.alignment.text import build_prototypes

    split = split_features(m, progress=False)
    head = fit_probe_head(m, split, build_prototypes(load_descriptions()))
    head.save(cache_dir() / f"probe-{checkpoint_sha(m)}.pt")
    return head


def text_head(model=None, prefer: str = "auto") -> tuple[AlignedHead, str]:
    """(head, "aligned" | "probe"). ``prefer``: auto (aligned if stored), aligned, or probe."""
    m = _model(model)
    if prefer in ("auto", "aligned"):
        head = load_alignment(m)
        if head is not None:
            return head, "aligned"
        if prefer == "aligned":
            raise FileNotFoundError(f"no {ALIGNMENT_FILE} for model {m.name}: run `tumorlens align`")
    return load_probe(m), "probe"


def _as_batch(images, size: int) -> torch.Tensor:
    """Network inputs [N, 1, S, S] as ``prepare_slice`` makes them (intensities in [0, 1], S the model's size).
    An image as read (raw intensities, its own size) is refused: fed as it is, it gave confident wrong
    descriptions (a glioma slice matched 'no tumour'); ``text_matches`` takes one as read."""
    if isinstance(images, (str, Path)):
        raise TypeError("expected network inputs [N, 1, S, S], not a path: read the image with "
                        "tumorlens.data.read_image and use text_matches, or prepare it with tumorlens.inference.prepare_slice")
    x = images.as_subclass(torch.Tensor) if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = x.float()
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None] if x.shape[0] != 1 else x[None]
    how = ("(tumorlens.inference.prepare_slice makes one from a 2D slice; text_matches takes an image as "
           "read_image returns it)")
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (size, size):
        raise InvalidInputError(None, f"expected normalised network inputs [N, 1, {size}, {size}], got {tuple(x.shape)} {how}")
    if not torch.isfinite(x).all():
        raise InvalidInputError(None, "network inputs contain non-finite values (NaN/inf)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InvalidInputError(None, f"network inputs hold intensities {lo:g}..{hi:g}, not the normalised 0..1 {how}")
    return x


def _labels(labels) -> np.ndarray:
    out = []
    for v in labels:
        if isinstance(v, str):
            if v not in CLASS_NAMES:
                raise InvalidInputError(None, f"unknown label {v!r}; expected one of {', '.join(CLASS_NAMES)}")
            out.append(CLASS_NAMES.index(v))
        else:
            if isinstance(v, bool) or not float(v).is_integer() or not 0 <= int(v) < len(CLASS_NAMES):
                raise InvalidInputError(None, f"label {v!r} is not a class index 0-{len(CLASS_NAMES) - 1} "
                                              f"or one of {', '.join(CLASS_NAMES)}")
            out.append(int(v))
    return np.asarray(out, np.int64)


def semantic_margin_rate(model, images, labels, *, head: str = "auto", min_margin: float = 0.0) -> float:
    """Share of ``images`` (normalised [N, 1, S, S] at the model's size) whose text-space vector is
    closer to its own class prototype than to every other one by more than ``min_margin``.

    Uses the aligned adapter when the model has one (``head="auto"``), else the plain model's linear
    text probe (fitted on the training split's features, so the comparison is fair).
    """
    m = _model(model)
    x = _as_batch(images, m.image_size)
    y = _labels(labels)
    if len(y) != len(x):
        raise InvalidInputError(None, f"{len(x)} images but {len(y)} labels")
    h, kind = text_head(m, head)
    feats, _ = extract_features(m.net, x)
    return margin_rate(semantic_margins(h.text_vectors(feats), y, h.prototypes), min_margin)


def nearest_descriptions(model, image_tensor, k: int = 3, *, head: str = "auto") -> list[dict]:
    """The ``k`` class descriptions nearest to one prepared network input ([1, 1, S, S] or [S, S], intensities
    in [0, 1]: ``prepare_slice``) in the text head's space: ``[{class_name, description, similarity}]``. For an
    image as read, ``text_matches`` gives the findings record's matches (there the decision's text vector,
    which the lesion-window classifier may join, so the two can differ)."""
    _check_k(k)
    m = _model(model)
    x = _as_batch(image_tensor, m.image_size)
    if len(x) != 1:
        raise InvalidInputError(None, f"nearest_descriptions takes one image, got {len(x)}")
    h, kind = text_head(m, head)
    feats, _ = extract_features(m.net, x)
    return h.nearest_descriptions(feats, k)[0]


def _check_k(k) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidInputError(None, f"k must be a whole number >= 1, got {k!r}")


def text_matches(model, img, slice_probabilities=None, k: int = 3,
                 vector: np.ndarray | None = None) -> tuple[list[dict], str | None]:
    """The findings record's ``text_matches`` for an image as read (2D, or a volume through its most
    tumour-like slice), and a note when there are none or the descriptions are stale. ``vector``: the
    decision's text-space vector (``Prediction.text_vector``: the aligned head's joined by the lesion-window
    classifier's where it spoke), whose nearest descriptions are then given.

    Uses the stored heads only (the aligned head, else the stored plain-model probe): fitting a probe
    here would need the training images, which a server does not have."""
    _check_k(k)
    from tumorlens.inference import representative_input

    m = _model(model)
    aligned = load_alignment(m)
    if vector is not None and aligned is not None:
        return aligned.descriptions_near(np.asarray(vector, np.float32)[None], k)[0], stale_texts(aligned)
    head = aligned or load_probe(m, fit_if_missing=False)
    if head is None:
        return [], f"model {m.name} has no stored text head: no class descriptions matched"
    feats, _ = extract_features(m.net, representative_input(img, m.image_size, slice_probabilities))
    if not np.isfinite(feats).all():
        return [], "the image's features are not finite numbers: no class descriptions matched"
    return head.nearest_descriptions(feats, k)[0], stale_texts(head)


@torch.no_grad()
def aligned_probabilities(model, images) -> tuple[np.ndarray, str]:
    """Class probabilities [N, 4] of the model's default decision: the aligned head's fused logits
    when ``alignment.pt`` is stored (it won on validation), else the plain classifier's softmax.
    Returns (probabilities, "aligned" | "plain")."""
    m = _model(model)
    x = _as_batch(images, m.image_size)
    feats, logits = extract_features(m.net, x)
    head = load_alignment(m)
    if head is None:
        return torch.as_tensor(logits).softmax(1).numpy(), "plain"
    return head.logits(feats).softmax(1).numpy(), "aligned"


def semantic_margin_for_folder(data_dir, model=None, limit: int | None = None, *, head: str = "auto",
                               progress: bool = True, details: bool = False) -> float | dict | None:
    """Semantic margin rate over a manifest folder's 2D images (the first ``limit`` records, as
    ``tumorlens evaluate --limit`` uses); multi-slice volumes are skipped. None if no 2D image.
    ``details``: ``{"rate", "n", "head"}`` instead (how many images, and which text head: "aligned" or "probe")."""
    from tqdm import tqdm

    from tumorlens.data.manifest import load_manifest
    from tumorlens.data.readers import is_volume, read_image
    from tumorlens.inference import representative_input

    m = _model(model)
    man = load_manifest(data_dir)
    records = man.records[:limit] if limit else man.records
    h, kind = text_head(m, head)
    vecs, ys, batch, batch_y = [], [], [], []

    def flush() -> None:
        if batch:
            feats, _ = extract_features(m.net, torch.cat(batch))
            vecs.append(h.text_vectors(feats))
            ys.extend(batch_y)
            batch.clear()
            batch_y.clear()

    for rec in tqdm(records, desc="semantic margin", disable=not progress, leave=False):
        img = read_image(rec.image)
        if is_volume(img) and sum(n > 1 for n in img.shape[1:]) > 2:
            continue  # a multi-slice volume
        # a one-slice volume (axial, coronal or sagittal) is prepared as ``predict`` prepares it
        batch.append(representative_input(img, m.image_size))
        batch_y.append(CLASS_NAMES.index(rec.label))
        if len(batch) == 32:
            flush()
    flush()
    if not ys:
        return None
    rate = margin_rate(semantic_margins(torch.cat(vecs), np.asarray(ys), h.prototypes))
    return {"rate": rate, "n": len(ys), "head": kind} if details else rate
