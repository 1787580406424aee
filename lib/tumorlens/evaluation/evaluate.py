"""``tumorlens evaluate``: any manifest folder, the shipped model by default; a table, JSON and a
confusion-matrix PNG."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm import tqdm

from tumorlens.alignment.familiarity import unfamiliar
from tumorlens.alignment.layer_statistics import unfamiliar_layers
from tumorlens.alignment.margin import margin_rate, own_minus_best_other
from tumorlens.caveats import DARK_BORDER_MIN
from tumorlens.data.manifest import Record, load_manifest
from tumorlens.data.normalize import dark_border_fraction
from tumorlens.data.readers import PHOTO_EXT, is_volume, read_image, read_mask
from tumorlens.evaluation.jsonio import json_ready
from tumorlens.evaluation.metrics import classification_metrics, dice_score, grouped_bootstrap
from tumorlens.inference import (
    Predictor,
    prepare_slice,
    slice_back,
    slice_display,
    tumour_mask,
)
from tumorlens.labels import NO_TUMOUR, class_index
from tumorlens.models.registry import version_label

log = logging.getLogger(__name__)

CONSTANT_IMAGE = "image is constant (blank): tumorlens predict refuses it"


def is_constant(img: MetaTensor) -> bool:
    """The check ``Predictor.predict`` makes: a constant image carries nothing to classify."""
    arr = img.detach().cpu().numpy()[0]
    return arr.size == 0 or not np.any(arr != arr.flat[0])


def truth_mask(path: Path, img: MetaTensor) -> np.ndarray:
    """A manifest mask as bool on ``img``'s own grid (2D: rows x cols; volume: X, Y, Z).

    A JPEG/PNG mask of a 2D image is read by ``read_mask`` (which tolerates compression noise); any
    other combination (a NIfTI/NRRD mask, a mask of a volume) goes through ``read_label_like``, which
    puts a label that carries geometry into the image's axis order: compared in raw voxel order, a
    mask 3D Slicer saved for a slice would be transposed.
    """
    if not is_volume(img) and path.name.lower().endswith(PHOTO_EXT):
        return read_mask(path, like=img)[0].numpy() > 0
    from tumorlens.activelearning.finetune import read_label_like

    return read_label_like(path, img) > 0


def warn_duplicates(records: list[Record], manifest_path: Path) -> None:
    """Warn about images listed more than once: each copy counts again in every metric."""
    counts = Counter(r.image for r in records)
    dups = {p: n for p, n in counts.items() if n > 1}
    if dups:
        shown = ", ".join(f"{p.name} ({n}x)" for p, n in list(dups.items())[:5])
        log.warning("%s: %d image(s) listed more than once, each copy counted in the metrics: %s%s", manifest_path,
                    len(dups), shown, " ..." if len(dups) > 5 else "")


def evaluate_folder(data_dir: str | Path, model: str | None = None, batch_size: int = 32,
                    progress: bool = True, limit: int | None = None) -> dict:
    """Classify every manifest image and segment those with masks; metrics as a JSON-ready dict
    (an undefined metric is None).

    2D images are batched through the same preparation ``Predictor.predict`` applies to one image;
    volumes (one slice or many) go through ``Predictor.predict`` itself, so evaluate and predict give
    the same probabilities for the same file. seg Dice is over tumour-labelled images with a mask (the
    README's definition); a ``no_tumor`` mask that outlines something is warned about and ignored. An
    unreadable image is a typed error naming the file; a blank 2D image is warned about and scored.
    """
    manifest = load_manifest(data_dir)
    records = manifest.records[:limit] if limit else manifest.records
    warn_duplicates(records, manifest.root / "manifest.csv")
    pred = Predictor(model)
    size = pred.size
    labels = np.array([class_index(r.label) for r in records], dtype=int)
    probs = np.zeros((len(records), len(pred.model.labels)), np.float32)
    dices = np.full(len(records), np.nan)  # per image; NaN where it does not count (no mask, or no_tumor)
    fam = np.full((len(records), 2), np.nan, np.float32)  # k-NN score, layer score (``Predictor.forward_batch``)
    border = np.full(len(records), np.nan, np.float32)  # 2D pictures: the dark-border caveat's measure
    window_changed = np.zeros(len(records), bool)  # the window classifier named another tumour type
    network = np.zeros_like(probs)  # the network's own probabilities, before the window classifier's opinion
    # cosine similarity to each class prototype of the vector the decision is the nearest prototype of (the
    # product's) and of the aligned head's alone (2D images): their semantic margins (issue 8)
    sims = np.full_like(probs, np.nan)
    network_sims = np.full_like(probs, np.nan)
    prototypes = None if pred.aligned_head is None else pred.aligned_head.prototypes.numpy()
    batch_x: list[torch.Tensor] = []
    batch_i: list[int] = []
    pending: dict[int, MetaTensor] = {}

    def truth_for(rec: Record, img: MetaTensor) -> np.ndarray | None:
        """The mask that counts towards seg Dice, or None."""
        if rec.mask is None:
            return None
        truth = truth_mask(rec.mask, img)
        if rec.label == NO_TUMOUR:
            if truth.any():
                log.warning("%s: mask of a %s image outlines %d pixels; ignored (seg Dice is over tumour images)",
                            rec.mask, NO_TUMOUR, int(truth.sum()))
            return None
        return truth

    def flush() -> None:
        if not batch_x:
            return
        p, seg, f, text = pred.forward_batch(torch.cat(batch_x))
        for j, i in enumerate(batch_i):
            img, shown, back = pending[i]
            network[i] = p[j].numpy()
            probs[i], lesion, said, vector = pred.decide_2d(network[i], seg[j:j + 1], shown,
                                                            None if text is None else text[j])
            lesion = slice_back(lesion, back)  # onto the stored grid, where the truth mask lies
            if text is not None:
                network_sims[i], sims[i] = prototypes @ text[j], prototypes @ vector
            window_changed[i] = bool(said and said["changed_label"])
            if f is not None:
                fam[i] = f[j]
            truth = truth_for(records[i], img)
            if truth is not None:
                called = pred.model.labels[int(probs[i].argmax())] != NO_TUMOUR
                dices[i] = dice_score(tumour_mask(lesion, called), truth)
        batch_x.clear()
        batch_i.clear()
        pending.clear()

    for i, rec in enumerate(tqdm(records, desc="evaluating", disable=not progress)):
        img = read_image(rec.image)
        if is_volume(img):
            r = pred.predict(img)  # refuses a constant volume itself, naming the file
            probs[i] = [r.probabilities[c] for c in pred.model.labels]
            said = r.extra.get("window_classifier")  # a one-slice file is decided as the 2D slice is
            network[i] = [said["network_probabilities"][c] for c in pred.model.labels] if said else probs[i]
            window_changed[i] = bool(said and said["changed_label"])
            if r.text_vector is not None:
                sims[i] = prototypes @ r.text_vector
            border[i] = r.extra.get("dark_border_fraction", np.nan)  # a one-slice file is a 2D picture
            if "familiarity" in r.extra:
                fa = r.extra["familiarity"]
                fam[i] = fa["score"], fa.get("layer_score", np.nan)
            truth = truth_for(rec, img)
            if truth is not None:
                dices[i] = dice_score(r.mask[0].numpy() > 0, truth)
            continue
        if is_constant(img):  # still scored: one blank slice must not stop a whole evaluation
            log.warning("%s: %s; it is scored anyway, as listed", rec.image, CONSTANT_IMAGE)
        border[i] = dark_border_fraction(img[0].numpy())
        shown, back = slice_display(img, img[0].numpy())  # as predict reads it: as a radiologist sees it
        batch_x.append(prepare_slice(shown, size))
        batch_i.append(i)
        pending[i] = (img, shown, back)
        if len(batch_x) >= batch_size:
            flush()
    flush()
    m = classification_metrics(labels, probs, pred.model.labels)
    has = np.isfinite(dices)
    m["seg_dice"] = float(dices[has].mean()) if has.any() else None
    m["seg_n"] = int(has.sum())
    m["ci95"] = grouped_bootstrap(labels, probs, pred.model.labels, [r.group for r in records], dices)
    stats = pred.layer_statistics
    m["familiarity"] = familiarity_summary(fam, labels, probs, pred.familiarity_calibration,
                                           None if stats is None else stats.threshold)
    m["dark_border"] = dark_border_summary(border, labels, probs)
    m["model"] = {"name": pred.model.name, "version": pred.model.version, "backbone": pred.model.backbone,
                  "lesion_refiner": pred.refiner is not None, "window_classifier": pred.window is not None}
    if pred.window is not None:
        alone = classification_metrics(labels, network, pred.model.labels)
        gain = grouped_bootstrap(labels, probs, pred.model.labels, [r.group for r in records], baseline=network)
        m["window_classifier"] = {"labels_changed": int(window_changed.sum()),
                                  "changed_and_right": int((window_changed & (probs.argmax(1) == labels)).sum()),
                                  "accuracy_network_alone": alone["accuracy"],
                                  "tumour_only_accuracy_network_alone": alone["tumour_only_accuracy"],
                                  "gain_ci95": {k: gain[k] for k in ("accuracy_gain", "tumour_only_accuracy_gain")
                                                if k in gain},
                                  # fitted on the model's grouped validation part: in-sample there, and the
                                  # model card's validation.*_left_out_groups is the figure for new patients
                                  "fusion": {"weight": pred.window.weight, "sharpness": pred.window.sharpness}}
    m |= margin_rates(sims, network_sims, labels)
    m["data"] = {"folder": Path(data_dir).name, "manifest_sha256": manifest.sha256}
    m = json_ready(m)
    m["_probs"] = probs
    m["_labels"] = labels
    return m


def margin_rates(sims: np.ndarray, network_sims: np.ndarray, labels: np.ndarray) -> dict:
    """``semantic_margin_rate``: the share of images whose decision's text-space vector is closer to its own
    class prototype than to any other (``sims`` [N, C], NaN rows not counted; None when no row is given);
    ``semantic_margin_rate_network`` the same for the aligned head's vector alone, before the window
    classifier joined it (2D images)."""
    def rate(s: np.ndarray) -> tuple[float | None, int]:
        has = np.isfinite(s).all(1)
        if not has.any():
            return None, 0
        return margin_rate(own_minus_best_other(s[has], labels[has])), int(has.sum())

    (r, n), (rn, _) = rate(sims), rate(network_sims)
    return {"semantic_margin_rate": r, "semantic_margin_rate_network": rn, "semantic_margin_n": n,
            "semantic_margin_head": "aligned" if r is not None else None}


def _accuracy_on(labels: np.ndarray, probs: np.ndarray):
    """sel -> accuracy on the selected images (None when none is selected), for the summaries' parts."""
    hit = probs.argmax(1) == labels
    return lambda sel: float(hit[sel].mean()) if sel.any() else None


def familiarity_summary(scores: np.ndarray, labels: np.ndarray, probs: np.ndarray, calibration: dict | None,
                        layer_threshold: float | None = None) -> dict | None:
    """How many images the model finds unlike its training images (``scores`` [N, 2]: k-NN score, layer score),
    and its accuracy on each part: on a new dataset a high unfamiliar share or a low accuracy among the
    unfamiliar says the data has shifted. An image is unfamiliar when either measure flags it, as in its record."""
    knn = scores[:, 0]
    if calibration is None or np.isnan(knn).all():
        return None
    ok = ~np.isnan(knn)
    by_knn = ok & unfamiliar(np.nan_to_num(knn, nan=1.0), calibration["threshold"])
    layers = scores[:, 1]
    has_layers = layer_threshold is not None and not np.isnan(layers[ok]).any()
    by_layers = ok & unfamiliar_layers(np.nan_to_num(layers, nan=0.0), layer_threshold) if has_layers \
        else np.zeros_like(ok)
    flagged = by_knn | by_layers
    acc = _accuracy_on(labels, probs)
    out = {"k": int(calibration["k"]), "threshold": float(calibration["threshold"]),
           "median": float(np.median(knn[ok])), "unfamiliar_fraction": float(flagged[ok].mean()),
           "n_unfamiliar": int(flagged.sum()), "n_unfamiliar_knn": int(by_knn.sum()),
           "accuracy_familiar": acc(ok & ~flagged), "accuracy_unfamiliar": acc(flagged)}
    if has_layers:
        out |= {"layer_threshold": float(layer_threshold), "layer_median": float(np.median(layers[ok])),
                "n_unfamiliar_layers": int(by_layers.sum())}
    return out


def dark_border_summary(border: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict | None:
    """How many 2D pictures get the dark-border caveat (their frame is not mostly dark, unlike an MRI slice of a
    head: every development slice scored >= 0.53), and the accuracy on each part: a dataset of crops inside the
    head, or of pictures that are not MRI, shows here."""
    ok = ~np.isnan(border)
    if not ok.any():
        return None
    below = ok & (np.nan_to_num(border, nan=1.0) < DARK_BORDER_MIN)
    acc = _accuracy_on(labels, probs)
    return {"threshold": DARK_BORDER_MIN, "n_pictures": int(ok.sum()), "min": float(border[ok].min()),
            "median": float(np.median(border[ok])), "n_below": int(below.sum()),
            "below_fraction": float(below[ok].mean()), "accuracy_rest": acc(ok & ~below), "accuracy_below": acc(below)}


def confusion_png(metrics: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics["confusion"]["labels"]
    mat = np.asarray(metrics["confusion"]["matrix"])
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    norm = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    shown = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's images (row)", fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(mat[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f} (n={metrics['n']})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(m: dict) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None or not np.isfinite(v) else f"{v:.4f}"

    lines = [f"model {m['model']['name']} {version_label(m['model']['version'])}  n={m['n']}",
             f"accuracy {num(m['accuracy'])}  tumour-only {num(m['tumour_only_accuracy'])}  "
             f"balanced {num(m['balanced_accuracy'])}  ECE {num(m['ece'])}  "
             + (f"seg Dice {m['seg_dice']:.4f} (n={m['seg_n']})" if m.get("seg_dice") is not None else "seg Dice -"),
             f"{'class':<12}{'precision':>10}{'recall':>8}{'f1':>8}{'n':>6}"]
    for c, v in m["per_class"].items():
        lines.append(f"{c:<12}{v['precision']:>10.3f}{v['recall']:>8.3f}{v['f1']:>8.3f}{v['n']:>6}")
    ci = m.get("ci95") or {}
    spans = [f"{name} {ci[key][0]:.3f}-{ci[key][1]:.3f}" for key, name in
             (("accuracy", "accuracy"), ("tumour_only_accuracy", "tumour-only"), ("seg_dice", "seg Dice")) if key in ci]
    if spans:
        lines.append(f"95 % interval, {ci['groups']} groups resampled: " + ", ".join(spans))
    f = m.get("familiarity")
    if f:
        acc = {k: "-" if f[k] is None else f"{f[k]:.3f}" for k in ("accuracy_familiar", "accuracy_unfamiliar")}
        layers = f" or layer score > {f['layer_threshold']:.3f}" if "layer_threshold" in f else ""
        lines.append(f"unfamiliar images (k-NN similarity < {f['threshold']:.3f}{layers}): {f['n_unfamiliar']} "
                     f"({100 * f['unfamiliar_fraction']:.1f} %); accuracy familiar {acc['accuracy_familiar']}, "
                     f"unfamiliar {acc['accuracy_unfamiliar']}")
    b = m.get("dark_border")
    if b and b["n_below"]:
        acc = {k: "-" if b[k] is None else f"{b[k]:.3f}" for k in ("accuracy_rest", "accuracy_below")}
        lines.append(f"pictures whose frame is not mostly dark (< {b['threshold']:.2f}, not framed like an MRI slice): "
                     f"{b['n_below']} ({100 * b['below_fraction']:.1f} %); accuracy on them {acc['accuracy_below']}, "
                     f"on the rest {acc['accuracy_rest']}")
    w = m.get("window_classifier")
    if w:
        line = (f"lesion-window classifier: changed the tumour type of {w['labels_changed']} images, "
                f"{w['changed_and_right']} of them now right; network alone: accuracy {w['accuracy_network_alone']:.4f}")
        g = w["gain_ci95"].get("accuracy_gain")
        if g:
            line += f", gain {100 * (m['accuracy'] - w['accuracy_network_alone']):+.1f} points (95 % {100 * g[0]:+.1f} to {100 * g[1]:+.1f})"
        lines.append(line)
    return "\n".join(lines)
