"""Do the active-learning strategies hand annotators the images the model gets wrong?

A relabel loop is worth its annotators' time when the images a strategy ranks first are the ones the model
misreads. On a manifest folder whose labels the model never trained on (default: the grouped validation
part, ``tumorlens split``), every image is scored as the MONAI Label app scores it (``uncertainty``:
MC-dropout predictive entropy, normalised; ``saliency_disagreement``: P(tumour) x (1 - Dice of the Grad-CAM
and seg masks)) and decided as ``tumorlens predict`` decides it. For each strategy and for a seeded random
order: the AUROC of the score against the product's errors, and how many errors lie among the first k picks
(against k times the error rate for random picks), with a cluster-bootstrap interval over patient groups.

    .venv/bin/python bench/activelearning.py [DATA_DIR] [--k 25,50,100] [--json OUT] [--png OUT]

Prints a table, writes JSON (default ``bench/results/activelearning.json``) and a picture of the errors
found against the number of images picked (default ``bench/results/activelearning.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "2")

STRATEGIES = ("uncertainty", "saliency_disagreement", "random")


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive outranks a negative (ties count a half); NaN without both kinds."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def errors_in_top(score: np.ndarray, wrong: np.ndarray, k: int) -> int:
    """Errors among the ``k`` highest scores (stable order, so ties keep the folder's order)."""
    top = np.argsort(-score, kind="mergesort")[:k]
    return int(wrong[top].sum())


def group_bootstrap(groups: np.ndarray, stat, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of ``stat(index)`` over resampled patient groups."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in uniq}
    vals = []
    for _ in range(n):
        idx = np.concatenate([members[g] for g in rng.choice(uniq, size=len(uniq), replace=True)])
        v = stat(idx)
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", nargs="?", default="runs/valsplit",
                    help="folder with manifest.csv (default runs/valsplit, from `tumorlens split`)")
    ap.add_argument("--model", default=None, help="model folder or name (default: the shipped model)")
    ap.add_argument("--k", default="25,50,100", help="pick sizes to report")
    ap.add_argument("--n", type=int, default=0, help="use only the first N images (0: all)")
    ap.add_argument("--json", default="bench/results/activelearning.json")
    ap.add_argument("--png", default="bench/results/activelearning.png")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from tqdm import tqdm

    from tumorlens.activelearning.disagreement import saliency_seg_disagreement
    from tumorlens.activelearning.uncertainty import image_uncertainty
    from tumorlens.data import read_image
    from tumorlens.inference import Predictor

    root = Path(args.data_dir)
    if not (root / "manifest.csv").is_file():
        ap.error(f"{root}: no manifest.csv (make the validation part with `tumorlens split "
                 "../shared/data/brain-mri-2d --out runs/valsplit`)")
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if args.n:
        rows = rows[: args.n]
    pred = Predictor(args.model) if args.model else Predictor()
    model = pred.model
    ks = [int(k) for k in args.k.split(",") if k.strip()]

    truth, decided, groups, scores = [], [], [], {s: [] for s in STRATEGIES}
    for r in tqdm(rows, desc="activelearning", unit="img"):
        img = read_image(root / r["image"])
        p = pred.predict(img)
        truth.append(r["label"])
        decided.append(p.label)
        groups.append(r.get("group") or r["image"])
        scores["uncertainty"].append(image_uncertainty(model, img)["entropy_normalised"])
        scores["saliency_disagreement"].append(saliency_seg_disagreement(model, img)["score"])
    n = len(truth)
    scores["random"] = list(np.random.default_rng(0).random(n))
    wrong = np.array([t != d for t, d in zip(truth, decided, strict=True)])
    tumour_truth = np.array([t != "no_tumor" for t in truth])
    groups_a = np.array(groups)
    rate = float(wrong.mean())

    out = {"data": str(root), "model": {"name": model.name, "version": model.version}, "n_images": n,
           "errors": int(wrong.sum()), "error_rate": rate, "k": ks, "strategies": {}}
    for s in STRATEGIES:
        sc = np.asarray(scores[s], dtype=np.float64)
        res = {"auroc_errors": auroc(sc, wrong),
               "auroc_errors_ci95": group_bootstrap(groups_a, lambda i, sc=sc: auroc(sc[i], wrong[i])),
               "top": {}}
        for k in ks:
            kk = min(k, n)
            top = np.argsort(-sc, kind="mergesort")[:kk]
            res["top"][str(k)] = {
                "errors": errors_in_top(sc, wrong, kk), "expected_at_random": round(rate * kk, 1),
                "tumour_images": int(tumour_truth[top].sum()),
                "by_true_class": {c: int(sum(truth[i] == c for i in top)) for c in sorted(set(truth))}}
        out["strategies"][s] = res
        out["strategies"][s]["curve"] = np.cumsum(wrong[np.argsort(-sc, kind="mergesort")]).tolist()

    head = f"{'strategy':<24}{'AUROC (95 % CI)':<24}" + "".join(f"{'errors in top ' + str(k):>18}" for k in ks)
    print(f"{root}: {n} images, {int(wrong.sum())} misread by the product ({rate:.3f}); model {model.name} "
          f"v{model.version}")
    print(head)
    for s in STRATEGIES:
        res = out["strategies"][s]
        lo, hi = res["auroc_errors_ci95"]
        cells = "".join(f"{res['top'][str(k)]['errors']:>8} (rand {res['top'][str(k)]['expected_at_random']:>5})"
                        for k in ks)
        print(f"{s:<24}{res['auroc_errors']:.3f} ({lo:.3f}-{hi:.3f})".ljust(48) + cells)

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        x = np.arange(1, n + 1)
        for s in STRATEGIES:
            ax.plot(x, out["strategies"][s]["curve"], label=s)
        ax.plot(x, rate * x, "k:", label="expected at random")
        ax.set_xlabel("images picked, in the strategy's order")
        ax.set_ylabel("misread images among them")
        ax.set_title(f"Active-learning picks: {n} images never trained on,\n{int(wrong.sum())} misread by the product",
                     fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        plt.close(fig)
    print(f"wrote {args.json}" + (f" and {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
