"""``tumorlens train-window``: fit the lesion-window classifier (``tumorlens.models.window``) of a trained model.

Each member learns the tumour type from windows around the true outlines of the model's own grouped
training part, pulled to its type's class prototype (the aligned head's) and away from the other three,
jittered in place, size, angle, side and gamma as the refiner's are (at inference the window sits
on the product's mask, near but not on the truth). The last epoch is kept (a one-cycle schedule ends
annealed): no epoch is picked on validation. The model's grouped validation part, every image through the
dual-head network and the product's mask as ``tumorlens evaluate`` runs them, then serves twice:

- the fusion's two numbers (``fit_fusion``: the window's share and the sharpness) are fitted there by
  log-loss on the tumour slices, as a calibration temperature is;
- the classifier is judged there, its fusion refitted without each patient group in turn and that group
  decided by it (``left_out_groups``), so the figure that decides whether it is stored never saw the
  images it is scored on. It is written next to the model only when that 4-class accuracy is higher than
  the network's alone. The semantic margin rates of the decisions' text-space vectors, before and after the
  window joined them, are reported beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from tqdm import tqdm

from tumorlens.alignment.api import decision_prototypes
from tumorlens.alignment.margin import margin_rate, semantic_margins
from tumorlens.data.readers import is_volume, read_image
from tumorlens.evaluation.metrics import classification_metrics
from tumorlens.labels import TUMOUR_CLASSES, class_index
from tumorlens.models.window import (
    WINDOW_FILE,
    WINDOW_WEIGHT,
    WindowClassifier,
    build_window_net,
    fuse,
    join_members,
    product_text_vector,
    tumour_types,
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

DEFAULTS = {"epochs": 40, "batch_size": 32, "lr": 2e-3, "weight_decay": 5e-2, "label_smoothing": 0.1, "seed": 0,
            "members": 3}


def validation_views(predictor, manifest, idx: list[int], progress: bool = True,
                     scales: tuple[float, ...] = (1.0,)) -> list[dict]:
    """Per 2D validation image: its label index, the dual-head probabilities, the aligned head's view
    (``TextOpinion``, None without one) and the window the product's mask gives (None when it calls no
    tumour), through ``Predictor.decide_2d`` as ``predict`` runs it
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
        probs, seg, _, text = predictor.forward_batch(prepare_slice(arr, predictor.size))
        p, lesion, *_ = predictor.decide_2d(probs[0].numpy(), seg, arr)
        called = predictor.model.labels[int(p.argmax())] != NO_TUMOUR
        crop = window_crop(arr, tumour_mask(lesion, True), scales=scales) if called else None
        out.append({"label": class_index(r.label), "group": r.group, "probs": p, "crop": crop,
                    "text": predictor.text_opinion(None if text is None else text[0])})
    return out


@torch.no_grad()
def window_outputs(net, views: list[dict]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(the window classifier's type probabilities, its scaled text-space vectors) per view index that has a
    window."""
    has = [j for j, v in enumerate(views) if v["crop"] is not None]
    if not has:
        return {}, {}
    x = torch.from_numpy(np.stack([views[j]["crop"] for j in has])).to(next(net.parameters()).device)
    u = torch.cat([net.scaled(x[k:k + 64]) for k in range(0, len(x), 64)])
    q = (u @ net.prototypes[net.types].T).softmax(1)
    return (dict(zip(has, q.float().cpu().numpy(), strict=True)),
            dict(zip(has, u.float().cpu().numpy(), strict=True)))


def product_margins(views: list[dict], u: dict[int, np.ndarray], weights: np.ndarray) -> np.ndarray | None:
    """Each view's semantic margin (``tumorlens.alignment.margin``) of the vector its decision is the nearest
    prototype of: the aligned head's alone, or with the window's (``product_text_vector``, ``weights`` the
    window's share per view) where the window spoke. None without an aligned head."""
    if not views or any(v["text"] is None for v in views):
        return None
    vecs = [product_text_vector(v["text"].vector, v["text"].scale, u[j], float(weights[j]))
            if j in u else v["text"].vector for j, v in enumerate(views)]
    return semantic_margins(np.stack(vecs), [v["label"] for v in views], views[0]["text"].prototypes)


def fit_fusion(network_types: np.ndarray, window: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(window's share, sharpness) of ``fuse`` that minimise the log-loss of the fused tumour type:
    ``network_types`` [N, 3] the network's type distribution (its tumour probabilities renormalised),
    ``window`` [N, 3] the window's, ``truth`` [N] the true type's index. Two numbers fitted on hundreds of
    slices, as a calibration temperature is; equal shares and sharpness 1 when nothing is given."""
    if len(truth) == 0:
        return WINDOW_WEIGHT, 1.0
    lt = np.log(np.clip(np.asarray(network_types, np.float64), 1e-8, 1.0))
    lw = np.log(np.clip(np.asarray(window, np.float64), 1e-8, 1.0))
    rows = np.arange(len(truth))

    def loss(ab: np.ndarray) -> float:
        z = ab[0] * lt + ab[1] * lw
        z = z - z.max(1, keepdims=True)
        return float(-(z[rows, truth] - np.log(np.exp(z).sum(1))).mean())

    a, b = minimize(loss, [1 - WINDOW_WEIGHT, WINDOW_WEIGHT], bounds=[(0.0, 10.0)] * 2, method="L-BFGS-B").x
    if a + b <= 1e-6:  # neither opinion helps: keep the network's (equal shares, flat would say nothing)
        return WINDOW_WEIGHT, 1.0
    return float(b / (a + b)), float(a + b)


def _fusion_inputs(views: list[dict], q: dict[int, np.ndarray], labels: tuple[str, ...],
                   rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(network type distributions, window distributions, true type) of the ``rows`` whose label is a tumour."""
    rows = [j for j in rows if labels[views[j]["label"]] in TUMOUR_CLASSES]
    t = np.array([tumour_types(views[j]["probs"], labels)[2] for j in rows]).reshape(-1, 3)
    w = np.array([q[j] for j in rows]).reshape(-1, 3)
    y = np.array([TUMOUR_CLASSES.index(labels[views[j]["label"]]) for j in rows], int)
    return t, w, y


def fused_decisions(views: list[dict], q: dict[int, np.ndarray], labels: tuple[str, ...],
                    weight: float, sharpness: float) -> np.ndarray:
    """Every view's probabilities, fused with its window where it has one."""
    fused = np.stack([v["probs"] for v in views]).astype(np.float32)
    for j, qj in q.items():
        fused[j] = fuse(views[j]["probs"], qj, labels, weight, sharpness)
    return fused


def left_out_weights(views: list[dict], q: dict[int, np.ndarray], labels: tuple[str, ...]) -> np.ndarray:
    """[N, 2]: each view's (window share, sharpness) fitted without its patient group."""
    out = np.tile([WINDOW_WEIGHT, 1.0], (len(views), 1))
    groups = np.array([v["group"] for v in views])
    for g in np.unique(groups):
        inside = [j for j in q if groups[j] == g]
        if inside:
            out[inside] = fit_fusion(*_fusion_inputs(views, q, labels, [j for j in q if groups[j] != g]))
    return out


def left_out_groups(views: list[dict], q: dict[int, np.ndarray], labels: tuple[str, ...],
                    weights: np.ndarray | None = None) -> np.ndarray:
    """Every view's fused probabilities with the fusion fitted without its patient group: an estimate of the
    fitted fusion on patients it has not seen (``weights``: ``left_out_weights`` when already fitted)."""
    fused = np.stack([v["probs"] for v in views]).astype(np.float32)
    ws = left_out_weights(views, q, labels) if weights is None else weights
    for j, qj in q.items():
        fused[j] = fuse(views[j]["probs"], qj, labels, *ws[j])
    return fused


def validation_accuracy(net, views: list[dict], labels: tuple[str, ...], fit: bool = True) -> dict:
    """Accuracy of the dual-head network alone and fused with ``net`` on the validation ``views``: with
    equal shares, with the fusion fitted on all of them (``weight``, ``sharpness``) and with it refitted
    without each patient group (``*_left_out_groups``, what decides storing), and the semantic margin rates of
    the decisions' text-space vectors (``semantic_margin_rate_*``, with an aligned head). ``fit=False``: equal
    shares only."""
    y = np.array([v["label"] for v in views])
    plain = np.stack([v["probs"] for v in views])
    q, u = window_outputs(net, views)
    hits = [TUMOUR_CLASSES[int(qj.argmax())] == labels[y[j]] for j, qj in q.items() if labels[y[j]] in TUMOUR_CLASSES]
    m0 = classification_metrics(y, plain, labels)
    m1 = classification_metrics(y, fused_decisions(views, q, labels, WINDOW_WEIGHT, 1.0), labels)
    out = {"n": len(views), "n_windows": len(q),
           "accuracy": m0["accuracy"], "tumour_only_accuracy": m0["tumour_only_accuracy"],
           "balanced_accuracy": m0["balanced_accuracy"], "ece": m0["ece"],
           "accuracy_fused_equal_shares": m1["accuracy"],
           "tumour_only_accuracy_fused_equal_shares": m1["tumour_only_accuracy"],
           "window_alone_accuracy": float(np.mean(hits)) if hits else None}
    if not fit:
        return out
    weight, sharpness = fit_fusion(*_fusion_inputs(views, q, labels, list(q)))
    fused = fused_decisions(views, q, labels, weight, sharpness)
    ws = left_out_weights(views, q, labels)
    m2 = classification_metrics(y, fused, labels)
    m3 = classification_metrics(y, left_out_groups(views, q, labels, ws), labels)
    margins = {"network": product_margins(views, {}, ws[:, 0]),
               "fused": product_margins(views, u, np.full(len(views), weight)),
               "fused_left_out_groups": product_margins(views, u, ws[:, 0])}
    return out | {f"semantic_margin_rate_{k}": margin_rate(m) for k, m in margins.items() if m is not None} | {
                  "window_scales": [round(float(v), 3) for v in net.scales.detach()],
                  "weight": round(weight, 4), "sharpness": round(sharpness, 4),
                  "accuracy_fused": m2["accuracy"], "tumour_only_accuracy_fused": m2["tumour_only_accuracy"],
                  "balanced_accuracy_fused": m2["balanced_accuracy"], "ece_fused": m2["ece"],
                  "accuracy_fused_left_out_groups": m3["accuracy"],
                  "tumour_only_accuracy_fused_left_out_groups": m3["tumour_only_accuracy"],
                  "labels_changed": int((fused.argmax(1) != plain.argmax(1)).sum()),
                  "n_groups": len({v["group"] for v in views})}


def train_window(model: str | None = None, data_dir: str | Path | None = None, epochs: int = DEFAULTS["epochs"],
                 max_images: int | None = None, save: bool = True, json_out: str | Path | None = None,
                 progress: bool = True, device: str | None = None, seed: int = DEFAULTS["seed"],
                 scales: tuple[float, ...] = (1.0,), members: int = DEFAULTS["members"]) -> dict:
    """Train, validate and (when the fused decision wins) store the window classifier of ``model`` (``members``
    networks from seeds ``seed``, ``seed + 1``, ...); returns
    the record written into the model card's ``window_classifier`` entry."""
    from tumorlens.inference import Predictor

    predictor = Predictor(model, window=False)
    labels = tuple(predictor.model.labels)
    data = companion_data(predictor, data_dir, max_images, "accuracy")
    train_items = training_outlines(data, progress)
    views = validation_views(predictor, data.manifest, data.val_idx, progress, scales)
    prototypes, text_key = decision_prototypes(predictor.model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def batch_loss(net, batch, rng):  # over all four prototypes: the window is also kept off no-tumour's
        x, _ = augmented_batch(batch, rng, scales=scales)
        y = torch.tensor([class_index(lab) for *_, lab in batch])
        return F.cross_entropy(net.class_logits(x.to(device)), y.to(device),
                               label_smoothing=DEFAULTS["label_smoothing"])

    def watched(net) -> dict:  # watched, never used to pick an epoch
        v = validation_accuracy(net, views, labels, fit=False) if views else {}
        return {"val_accuracy_fused_equal_shares": v.get("accuracy_fused_equal_shares"),
                "val_window_alone": v.get("window_alone_accuracy")}

    nets, history, seconds = [], [], 0.0
    for k in range(members):  # each member from its own seed, trained alone; their mean decides
        torch.manual_seed(seed + k)
        rng = np.random.default_rng(seed + k)
        member = build_window_net(torch.from_numpy(prototypes), len(scales)).to(device)
        h, sec = one_cycle_fit(member, train_items, epochs, DEFAULTS, batch_loss, rng,
                               f"training window classifier {k + 1}/{members}", 0.2, progress, watched)
        nets.append(member.eval().cpu())
        history += [r | {"member": k + 1} for r in h]
        seconds += sec
    net = join_members(nets)
    net = net.eval().cpu()
    val = validation_accuracy(net, views, labels) if views else {"n": 0}
    clf = WindowClassifier(net=net, scales=tuple(scales), weight=val.get("weight", WINDOW_WEIGHT),
                           sharpness=val.get("sharpness", 1.0), text_key=text_key)
    wins = val["n"] > 0 and val["accuracy_fused_left_out_groups"] > val["accuracy"]
    return conclude(clf, predictor, WINDOW_FILE, "window_classifier", data, len(train_items),
                    fit_summary(DEFAULTS, epochs, device, seconds, history, seed=seed, members=members), val, wins,
                    save, json_out,
                    f"fusing the window classifier did not raise accuracy on validation's left-out groups "
                    f"({val.get('accuracy') or 0:.4f} -> {val.get('accuracy_fused_left_out_groups') or 0:.4f})",
                    scales=list(scales), members=members, weight=clf.weight, sharpness=clf.sharpness,
                    fitted_on="the model's grouped validation part (log-loss over its tumour slices with a window)")
