"""``tumorlens evaluate``: any manifest folder, the shipped model by default; a table, JSON and a
confusion-matrix PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tumorlens.alignment.familiarity import unfamiliar
from tumorlens.data.manifest import load_manifest
from tumorlens.data.readers import is_volume, read_image, read_mask
from tumorlens.evaluation.metrics import classification_metrics, dice_score, grouped_bootstrap
from tumorlens.inference import Predictor, prepare_slice, seg_on_slice, tumour_mask
from tumorlens.labels import NO_TUMOUR, class_index


def evaluate_folder(data_dir: str | Path, model: str | None = None, batch_size: int = 32,
                    progress: bool = True, limit: int | None = None) -> dict:
    """Classify every manifest image and segment those with masks; metrics as a dict."""
    manifest = load_manifest(data_dir)
    records = manifest.records[:limit] if limit else manifest.records
    pred = Predictor(model)
    size = pred.size
    labels = np.array([class_index(r.label) for r in records])
    probs = np.zeros((len(records), len(pred.model.labels)), np.float32)
    dices = np.full(len(records), np.nan)  # per image; NaN where the image has no mask
    fam = np.full(len(records), np.nan, np.float32)
    batch_x, batch_i = [], []

    def flush():
        if not batch_x:
            return
        p, seg, f = pred.forward_batch(torch.cat(batch_x))
        for j, i in enumerate(batch_i):
            probs[i] = p[j].numpy()
            if f is not None:
                fam[i] = f[j]
            rec = records[i]
            if rec.mask is not None:
                img = pending[i]
                truth = read_mask(rec.mask, like=img)[0].numpy() > 0
                called = pred.model.labels[int(probs[i].argmax())] != NO_TUMOUR
                dices[i] = dice_score(tumour_mask(seg_on_slice(seg[j:j + 1], img[0].numpy()), called), truth)
        batch_x.clear()
        batch_i.clear()
        pending.clear()

    pending: dict[int, object] = {}
    for i, rec in enumerate(tqdm(records, desc="evaluating", disable=not progress)):
        img = read_image(rec.image)
        if is_volume(img) and img.shape[-1] > 1:
            r = pred.predict(img)
            probs[i] = [r.probabilities[c] for c in pred.model.labels]
            if "familiarity" in r.extra:
                fam[i] = r.extra["familiarity"]["score"]
            if rec.mask is not None:
                truth = read_mask(rec.mask, like=img)[0].numpy() > 0
                dices[i] = dice_score(r.mask[0].numpy() > 0, truth)
            continue
        arr = img[0].numpy() if not is_volume(img) else img[0, :, :, 0].numpy()
        batch_x.append(prepare_slice(arr, size))
        batch_i.append(i)
        pending[i] = img if not is_volume(img) else img[..., 0]
        if len(batch_x) >= batch_size:
            flush()
    flush()
    m = classification_metrics(labels, probs, pred.model.labels)
    has = np.isfinite(dices)
    m["seg_dice"] = float(dices[has].mean()) if has.any() else None
    m["seg_n"] = int(has.sum())
    m["ci95"] = grouped_bootstrap(labels, probs, pred.model.labels, [r.group for r in records], dices)
    m["familiarity"] = familiarity_summary(fam, labels, probs, pred.familiarity_calibration)
    m["model"] = {"name": pred.model.name, "version": pred.model.version, "backbone": pred.model.backbone}
    m["data"] = {"folder": Path(data_dir).name, "manifest_sha256": manifest.sha256}
    m["_probs"] = probs
    m["_labels"] = labels
    return m


def familiarity_summary(scores: np.ndarray, labels: np.ndarray, probs: np.ndarray, calibration: dict | None) -> dict | None:
    """How many images the model finds unlike its training images, and its accuracy on each part: on a
    new dataset a high unfamiliar share or a low accuracy among the unfamiliar says the data has shifted."""
    if calibration is None or np.isnan(scores).all():
        return None
    ok = ~np.isnan(scores)
    flagged = ok & unfamiliar(np.nan_to_num(scores, nan=1.0), calibration["threshold"])
    hit = probs.argmax(1) == labels

    def acc(sel: np.ndarray) -> float | None:
        return float(hit[sel].mean()) if sel.any() else None

    return {"k": int(calibration["k"]), "threshold": float(calibration["threshold"]),
            "median": float(np.median(scores[ok])), "unfamiliar_fraction": float(flagged[ok].mean()),
            "n_unfamiliar": int(flagged.sum()), "accuracy_familiar": acc(ok & ~flagged),
            "accuracy_unfamiliar": acc(flagged)}


def confusion_png(metrics: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics["confusion"]["labels"]
    mat = np.asarray(metrics["confusion"]["matrix"])
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    norm = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
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
    lines = [f"model {m['model']['name']} v{m['model']['version']}  n={m['n']}",
             f"accuracy {m['accuracy']:.4f}  tumour-only {m['tumour_only_accuracy']:.4f}  "
             f"balanced {m['balanced_accuracy']:.4f}  ECE {m['ece']:.4f}  "
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
        lines.append(f"unfamiliar images (k-NN similarity < {f['threshold']:.3f}): {f['n_unfamiliar']} "
                     f"({100 * f['unfamiliar_fraction']:.1f} %); accuracy familiar {acc['accuracy_familiar']}, "
                     f"unfamiliar {acc['accuracy_unfamiliar']}")
    return "\n".join(lines)
