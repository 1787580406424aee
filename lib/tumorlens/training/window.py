"""``tumorlens train-window``: fit the lesion-window classifier (``tumorlens.models.window``) of a trained model.

It learns the tumour type from windows around the true outlines of the model's own grouped training
part, jittered in place, size, angle, side and gamma as the refiner's are (at inference the window sits
on the product's mask, near but not on the truth). The last epoch is kept (a one-cycle schedule ends
annealed): no epoch is picked on validation. It is judged on the model's grouped validation part, every
image through the dual-head network and the product's mask as ``tumorlens evaluate`` runs them, with and
without the fusion, and written next to the model only when the fused 4-class accuracy is higher.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tumorlens.data.readers import is_volume, read_image
from tumorlens.evaluation.metrics import classification_metrics
from tumorlens.labels import TUMOUR_CLASSES, class_index
from tumorlens.models.window import (
    WINDOW_FILE,
    WINDOW_WEIGHT,
    WindowClassifier,
    build_window_net,
    fuse,
    window_crop,
)
from tumorlens.training.companion import (
    augmented_batch,
    companion_data,
    conclude,
    fit_summary,
    one_cycle_fit,
    training_outlines,
)

DEFAULTS = {"epochs": 40, "batch_size": 32, "lr": 2e-3, "weight_decay": 5e-2, "label_smoothing": 0.1, "seed": 0}


def validation_views(predictor, manifest, idx: list[int], progress: bool = True,
                     scales: tuple[float, ...] = (1.0,)) -> list[dict]:
    """Per 2D validation image: its label index, the dual-head probabilities and the window the product's
    mask gives (None when it calls no tumour), through ``Predictor.decide_2d`` as ``predict`` runs it
    (``predictor`` is one without a window classifier)."""
    from tumorlens.inference import prepare_slice, tumour_mask
    from tumorlens.labels import NO_TUMOUR

    out = []
    for i in tqdm(idx, desc="validation images", disable=not progress):
        r = manifest.records[i]
        img = read_image(r.image)
        if is_volume(img):
            continue
        arr = img[0].numpy().astype(np.float32)
        probs, seg, _ = predictor.forward_batch(prepare_slice(arr, predictor.size))
        p, lesion, _ = predictor.decide_2d(probs[0].numpy(), seg, arr)
        called = predictor.model.labels[int(p.argmax())] != NO_TUMOUR
        crop = window_crop(arr, tumour_mask(lesion, True), scales=scales) if called else None
        out.append({"label": class_index(r.label), "probs": p, "crop": crop})
    return out


@torch.no_grad()
def validation_accuracy(net, views: list[dict], labels: tuple[str, ...]) -> dict:
    """Accuracy of the dual-head network alone and fused with ``net`` on the validation ``views``."""
    y = np.array([v["label"] for v in views])
    plain = np.stack([v["probs"] for v in views])
    fused = plain.copy()
    has = [j for j, v in enumerate(views) if v["crop"] is not None]
    window_hits = []
    if has:
        x = torch.from_numpy(np.stack([views[j]["crop"] for j in has])).to(next(net.parameters()).device)
        q = torch.cat([net(x[k:k + 64]).softmax(1) for k in range(0, len(x), 64)]).float().cpu().numpy()
        for j, qj in zip(has, q, strict=True):
            fused[j] = fuse(plain[j], qj, labels)
            if labels[y[j]] in TUMOUR_CLASSES:
                window_hits.append(TUMOUR_CLASSES[int(qj.argmax())] == labels[y[j]])
    m0, m1 = classification_metrics(y, plain, labels), classification_metrics(y, fused, labels)
    return {"n": len(views), "n_windows": len(has),
            "accuracy": m0["accuracy"], "accuracy_fused": m1["accuracy"],
            "tumour_only_accuracy": m0["tumour_only_accuracy"], "tumour_only_accuracy_fused": m1["tumour_only_accuracy"],
            "balanced_accuracy": m0["balanced_accuracy"], "balanced_accuracy_fused": m1["balanced_accuracy"],
            "window_alone_accuracy": float(np.mean(window_hits)) if window_hits else None,
            "labels_changed": int((fused.argmax(1) != plain.argmax(1)).sum())}


def train_window(model: str | None = None, data_dir: str | Path | None = None, epochs: int = DEFAULTS["epochs"],
                 max_images: int | None = None, save: bool = True, json_out: str | Path | None = None,
                 progress: bool = True, device: str | None = None, seed: int = DEFAULTS["seed"],
                 scales: tuple[float, ...] = (1.0,)) -> dict:
    """Train, validate and (when the fused decision wins) store the window classifier of ``model``; returns
    the record written into the model card's ``window_classifier`` entry."""
    from tumorlens.inference import Predictor

    predictor = Predictor(model, window=False)
    labels = tuple(predictor.model.labels)
    data = companion_data(predictor, data_dir, max_images, "accuracy")
    train_items = training_outlines(data, progress)
    views = validation_views(predictor, data.manifest, data.val_idx, progress, scales)
    targets = {c: i for i, c in enumerate(TUMOUR_CLASSES)}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_window_net(len(scales)).to(device)

    def batch_loss(net, batch, rng):
        x, _ = augmented_batch(batch, rng, scales=scales)
        y = torch.tensor([targets[lab] for *_, lab in batch])
        return F.cross_entropy(net(x.to(device)), y.to(device), label_smoothing=DEFAULTS["label_smoothing"])

    def watched(net) -> dict:  # watched, never used to pick an epoch
        v = validation_accuracy(net, views, labels) if views else {}
        return {"val_accuracy_fused": v.get("accuracy_fused"), "val_window_alone": v.get("window_alone_accuracy")}

    history, seconds = one_cycle_fit(net, train_items, epochs, DEFAULTS, batch_loss, rng,
                                     "training window classifier", 0.2, progress, watched)
    clf = WindowClassifier(net=net.eval().cpu(), scales=tuple(scales))
    val = validation_accuracy(clf.net, views, labels) if views else {"n": 0}
    wins = val["n"] > 0 and val["accuracy_fused"] > val["accuracy"]
    return conclude(clf, predictor, WINDOW_FILE, "window_classifier", data, len(train_items),
                    fit_summary(DEFAULTS, epochs, device, seconds, history, seed=seed), val, wins, save, json_out,
                    f"fusing the window classifier did not raise accuracy on validation ({val.get('accuracy') or 0:.4f} "
                    f"-> {val.get('accuracy_fused') or 0:.4f})", scales=list(scales), weight=WINDOW_WEIGHT)
