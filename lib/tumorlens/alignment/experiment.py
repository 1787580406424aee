"""``tumorlens align``: fit the aligned head of a trained model, compare it with the plain model on the
grouped validation split, run the prompt ablation and the negation retrieval, and store the adapter
next to the model only if it is at least as accurate as the plain classifier."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from tumorlens.alignment.familiarity import calibrate as calibrate_familiarity
from tumorlens.alignment.features import checkpoint_sha, split_features
from tumorlens.alignment.head import FUSIONS, AlignedHead, build_head, classifier_layer, make_head
from tumorlens.alignment.margin import margin_rate, semantic_margins
from tumorlens.alignment.projection import fit_linear_probe
from tumorlens.alignment.prompts import ABLATIONS, ablate, load_descriptions
from tumorlens.alignment.retrieval import negation_retrieval
from tumorlens.alignment.text import build_prototypes, encoder_id
from tumorlens.evaluation.metrics import classification_metrics
from tumorlens.labels import CLASS_NAMES
from tumorlens.models.registry import LoadedModel, load_model


def fit_probe_head(model: LoadedModel, split: dict, protos: dict) -> AlignedHead:
    """The plain model in text space: a ridge probe, no cache, no classifier term (alpha = gamma = 0)."""
    probe = fit_linear_probe(split["train_f"], split["train_y"], protos["prototypes"])
    head = make_head(probe, protos, classifier_layer(model.net), cache=None)
    head.alpha = head.gamma = 0.0
    head.meta = {"kind": "probe", "checkpoint_sha": checkpoint_sha(model), "model": model.name,
                 "model_version": model.version, "prompts_key": protos["key"], "encoder": encoder_id()}
    return head


def _acc(pred, y) -> float:
    return float((np.asarray(pred) == np.asarray(y)).mean())


def prompt_ablation(split: dict, classifier, desc: dict, *, kinds=ABLATIONS, fusions=FUSIONS,
                    base_heads: dict | None = None, progress: bool = False) -> dict:
    """Accuracy and share of changed predictions when the descriptions are edited, per fusion:
    ``frozen`` keeps the fitted adapter and swaps the prototypes at inference; ``refit`` refits the
    projection and re-tunes on the edited text. A change below 0.5 % means decorative prototypes."""
    vf, vy = split["val_f"], split["val_y"]
    protos = {k: build_prototypes(ablate(desc, k)) for k in kinds}
    heads_true = base_heads or {}
    refit_proj = {}
    out: dict = {}
    for fusion in fusions:
        if fusion not in heads_true:
            h = build_head(split["train_f"], split["train_y"], protos["true"], classifier, fusion=fusion)
            h.tune(vf, vy)
            heads_true[fusion] = h
        base = heads_true[fusion]
        ref = base.predict(vf)
        res = {"true": {"accuracy": _acc(ref, vy)}}
        for k in kinds:
            if k == "true":
                continue
            frozen = base.predict(vf, prototypes=protos[k]["prototypes"])
            if k not in refit_proj:
                refit_proj[k] = build_head(split["train_f"], split["train_y"], protos[k], classifier, fusion=fusion)
            hk = copy.copy(refit_proj[k])
            hk.fusion = fusion
            hk.tune(vf, vy)
            refit = hk.predict(vf)
            res[k] = {"frozen": {"accuracy": _acc(frozen, vy), "changed": float((frozen != ref).mean())},
                      "refit": {"accuracy": _acc(refit, vy), "changed": float((refit != ref).mean()),
                                "alpha": hk.alpha, "beta": hk.beta, "gamma": hk.gamma}}
        # decorative: neutralising the text (frozen adapter) changes < 0.5 % of the predictions
        res["decorative"] = bool("neutral" in res and res["neutral"]["frozen"]["changed"] < 0.005)
        out[fusion] = res
    return out


def run_alignment(model=None, *, prompts: str | Path | None = None, max_images: int | None = None,
                  save: bool = True, progress: bool = True, ablation: bool = True) -> dict:
    """Everything issue 8 measures, on the model's own grouped validation split; returns the JSON."""
    t0 = time.time()
    m = model if isinstance(model, LoadedModel) else load_model(model)
    split = split_features(m, max_images=max_images, progress=progress)
    desc = load_descriptions(prompts)
    protos = build_prototypes(desc)
    clf = classifier_layer(m.net)
    vf, vy, groups = split["val_f"], split["val_y"], split["val_groups"]
    t_feat = time.time() - t0

    plain_probs = torch.as_tensor(split["val_logits"]).softmax(1).numpy()
    plain = classification_metrics(vy, plain_probs, CLASS_NAMES)
    probe = fit_probe_head(m, split, protos)
    probe_t = probe.text_vectors(vf)

    heads, variants = {}, {}
    for fusion in FUSIONS:
        h = build_head(split["train_f"], split["train_y"], protos, clf, fusion=fusion)
        tuned = h.tune(vf, vy)
        cross = h.crossfit_accuracy(vf, vy, groups)
        lo = h.logits(vf)
        met = classification_metrics(vy, lo.softmax(1).numpy(), CLASS_NAMES)
        heads[fusion] = h
        variants[fusion] = {"accuracy": met["accuracy"], "tumour_only_accuracy": met["tumour_only_accuracy"],
                            "balanced_accuracy": met["balanced_accuracy"], "ece": met["ece"],
                            "crossfit_accuracy": cross, "alpha": tuned["alpha"], "beta": tuned["beta"],
                            "gamma": tuned["gamma"]}
    aligned = heads["textspace"]
    # components of the aligned decision (same projection, hyper-parameters fixed to show each part)
    parts = aligned.parts(vf)
    comp = {}
    for name, (a, g) in {"prototypes_only": (0.0, 0.0), "prototypes+cache": (aligned.alpha, 0.0),
                         "prototypes+cache+classifier": (aligned.alpha, aligned.gamma)}.items():
        comp[name] = _acc(aligned.combine(parts, a, g)[0].argmax(1).numpy(), vy)

    raw = {"plain_probe": semantic_margins(probe_t, vy, protos["prototypes"]),
           "aligned": semantic_margins(aligned.text_vectors(vf), vy, protos["prototypes"]),
           "aligned_projection_only": semantic_margins(parts["z"], vy, protos["prototypes"])}
    margins = {k: margin_rate(v) for k, v in raw.items()}
    margin_median = {k: float(np.median(v)) for k, v in raw.items()}
    retrieval = {"plain_probe": negation_retrieval(probe_t, vy),
                 "aligned": negation_retrieval(aligned.text_vectors(vf), vy)}
    abl = prompt_ablation(split, clf, desc, base_heads=heads, progress=progress) if ablation else None

    # at least as accurate on validation, and not only thanks to tuning on it (cross-fitted within 1 point)
    wins = (variants["textspace"]["accuracy"] >= plain["accuracy"]
            and variants["textspace"]["crossfit_accuracy"] >= plain["accuracy"] - 0.01)
    meta = {"kind": "aligned", "checkpoint_sha": checkpoint_sha(m), "model": m.name, "model_version": m.version,
            "prompts_key": protos["key"], "encoder": encoder_id(), "n_train": int(len(split["train_y"])),
            "val_accuracy": variants["textspace"]["accuracy"], "plain_val_accuracy": plain["accuracy"],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "familiarity": calibrate_familiarity(aligned.cache, vf)}
    aligned.meta = meta
    saved = {}
    full = max_images is None
    if save and full:
        saved["text_probe"] = str(probe.save(Path(m.path) / "text_probe.pt"))
        target = Path(m.path) / "alignment.pt"
        if wins:
            saved["alignment"] = str(aligned.save(target))
        elif target.is_file():
            target.unlink()  # a stale adapter that no longer wins must not stay the default
    return {
        "model": {"name": m.name, "version": m.version, "checkpoint_sha": meta["checkpoint_sha"]},
        "data": {"n_train": int(len(split["train_y"])), "n_val": int(len(vy)), "max_images": max_images,
                 "split": "grouped, model config val_fraction/seed"},
        "prompts": {"key": protos["key"], "encoder": encoder_id(),
                    "n_descriptions": {c: len(desc[c]) for c in CLASS_NAMES}},
        "plain": {k: plain[k] for k in ("accuracy", "tumour_only_accuracy", "balanced_accuracy", "ece")},
        "aligned": variants,
        "aligned_components": comp,
        "semantic_margin_rate": margins,
        "semantic_margin_median": margin_median,
        "prompt_ablation": abl,
        "negation_retrieval": retrieval,
        "familiarity": meta["familiarity"],
        "decision": {"aligned_default": bool(wins), "rule": "aligned (textspace) val accuracy >= plain and its cross-fitted val accuracy >= plain - 0.01",
                     "saved": saved},
        "seconds": {"features": round(t_feat, 1), "total": round(time.time() - t0, 1)},
    }
