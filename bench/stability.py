"""Stability benchmark (issue 3 item 7, issue 8 item 7): short training runs over optimisers x learning
rates x backbones on a fixed subset; prints the accuracy table and the spread (best - worst) per
backbone, and writes JSON.

``--aligned`` adds, for every grid cell, the text-anchored model trained the same way: the run is
repeated with the joint text-alignment loss (``alignment.enabled``) and decided by the aligned head
(projection + Tip-Adapter, fixed hyper-parameters: no tuning on validation). Every plain run is also
scored with that head fitted post hoc on its frozen encoder (``posthoc``), which separates what the
head does from what the training loss does. ``--shift`` adds train-on-some / test-on-the-rest runs over
figshare views and acquisition batches. ``--init-from MODEL`` starts every cell from that trained
model's weights instead of from scratch (the fine-tuning regime of the TumorCLIP study, whose backbones
started from ImageNet; here the project's own model is the only pretrained encoder): the grid then asks
how much optimiser and learning rate matter once the encoder already knows the task. The model must have
been trained on the same grouped split (the grid's validation subset lies inside its validation part).
``--frozen MODEL`` trains no encoder at all: every cell trains only the heads on that model's frozen
features (Tip-Adapter's regime), which separates the heads' sensitivity from the encoder's.

    .venv/bin/python bench/stability.py --aligned --json bench/results/stability.json

Not part of CI (about an hour of 2-core CPU with the defaults).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tumorlens.labels import CLASS_NAMES  # noqa: E402
from tumorlens.paths import shared_data_dir  # noqa: E402

FIXED = {"alpha": 1.0, "beta": 5.5, "gamma": 1.0}  # aligned hyper-parameters in the grid: fixed, not tuned


def split_like_train(manifest, dc: dict) -> tuple[list[int], list[int]]:
    """The exact train/val indices ``tumorlens.training.train.train`` uses (grouped split + max_images)."""
    from tumorlens.data.splits import training_split

    return training_split(manifest, float(dc["val_fraction"]), int(dc["seed"]), dc.get("max_images"))


def aligned_accuracy(net, protos, tr_x, tr_y, te_sets: dict) -> dict:
    """Fit the aligned head on the run's training features; accuracy on each named (x, y) set."""
    from tumorlens.alignment.features import extract_features
    from tumorlens.alignment.head import build_head, classifier_layer

    trf, _ = extract_features(net, tr_x)
    head = build_head(trf, tr_y, protos, classifier_layer(net), fusion="textspace")
    head.alpha, head.beta, head.gamma = FIXED["alpha"], FIXED["beta"], FIXED["gamma"]
    out = {}
    for name, (x, y) in te_sets.items():
        f, _ = extract_features(net, x)
        out[name] = float((head.predict(f) == y).mean())
    return out


def plain_accuracy(net, x, y) -> float:
    from tumorlens.alignment.features import extract_features

    _, lo = extract_features(net, x)
    return float((lo.argmax(1) == y).mean())


def run_one(cfg: dict, workdir: Path) -> dict:
    """Train one model with the project's own ``train`` (same split, losses and selection)."""
    from tumorlens.training.train import train

    cfg = json.loads(json.dumps(cfg))
    cfg["output"] = {"dir": str(workdir / "model"), "name": "bench"}
    t0 = time.time()
    res = train(cfg, progress=False)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def fit_linear_classifier(feats: np.ndarray, labels: np.ndarray, optimizer: str, lr: float, *, epochs: int = 30,
                          batch: int = 256, weight_decay: float = 1e-3, seed: int = 0) -> torch.nn.Linear:
    """The plain model's counterpart of ``fit_projection`` on frozen features: a linear classifier on the
    same standardised features, trained by cross-entropy with the same optimiser, schedule and steps;
    returned as one ``nn.Linear`` on raw features (the standardisation folded in)."""
    from tumorlens.training.train import make_optimizer

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(feats, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
    xs = (x - mean) / std
    lin = torch.nn.Linear(x.shape[1], len(CLASS_NAMES))
    opt = make_optimizer(optimizer, lin.parameters(), lr, weight_decay)
    n = len(x)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * max(1, (n + batch - 1) // batch))
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            loss = torch.nn.functional.cross_entropy(lin(xs[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    out = torch.nn.Linear(x.shape[1], len(CLASS_NAMES))
    with torch.no_grad():
        out.weight.copy_(lin.weight / std)
        out.bias.copy_(lin.bias - (lin.weight / std) @ mean)
    return out.eval()


def frozen_grid(args, protos) -> list[dict]:
    """Tip-Adapter's own regime: the encoder of ``args.frozen`` stays frozen (its grouped split, every image)
    and each cell trains only what sits on it, with the cell's optimiser and learning rate for the same steps:
    plain = a linear classifier (cross-entropy); aligned = the text projection (prototype loss), read through
    the head with the training-free cache and that cell's classifier, fused with the fixed hyper-parameters.
    ``projection_only`` is the projection's own nearest-prototype decision; ``cache_only`` the cache's."""
    from tumorlens.alignment.features import split_features
    from tumorlens.alignment.head import make_head
    from tumorlens.alignment.projection import fit_projection
    from tumorlens.alignment.tip_adapter import TipAdapter
    from tumorlens.models.registry import load_model

    model = load_model(args.frozen)
    sf = split_features(model, progress=True)
    trf, tr_y, vaf, va_y = sf["train_f"], sf["train_y"], sf["val_f"], sf["val_y"]
    cache = TipAdapter(trf, tr_y, len(CLASS_NAMES), beta=FIXED["beta"])
    cache_only = float((cache.scores(torch.as_tensor(vaf)).argmax(1).numpy() == va_y).mean())
    rows = []
    for opt, lr in tqdm(list(itertools.product(args.optimizers, args.lrs)), desc="frozen-encoder grid"):
        t0 = time.time()
        lin = fit_linear_classifier(trf, tr_y, opt, lr, epochs=args.head_epochs)
        with torch.no_grad():
            plain = float((lin(torch.as_tensor(vaf)).argmax(1).numpy() == va_y).mean())
        proj = fit_projection(trf, tr_y, protos["prototypes"], optimizer=opt, lr=lr, epochs=args.head_epochs)
        head = make_head(proj, protos, lin, cache=cache, fusion="textspace")
        head.alpha, head.beta, head.gamma = FIXED["alpha"], FIXED["beta"], FIXED["gamma"]
        aligned = float((head.predict(vaf) == va_y).mean())
        head.alpha = head.gamma = 0.0
        row = {"backbone": model.backbone, "optimizer": opt, "lr": lr, "accuracy": plain, "aligned_accuracy": aligned,
               "projection_only": float((head.predict(vaf) == va_y).mean()), "cache_only": cache_only,
               "n_train": int(len(tr_y)), "n_val": int(len(va_y)), "seconds": round(time.time() - t0, 1)}
        tqdm.write(json.dumps(row))
        rows.append(row)
    return rows


RESUME_KEYS = ("data", "max_images", "size", "epochs", "precision", "batch_size", "aligned", "aligned_backbones",
               "init_from", "seeds")


def grid(args, protos, base: dict) -> list[dict]:
    from tumorlens.data.dataset import load_arrays
    from tumorlens.data.manifest import load_manifest

    root = Path(base["data"]["root"])
    manifest = load_manifest(root)
    images, _, labels = load_arrays(manifest, args.size)
    tr, va = split_like_train(manifest, base["data"])
    partial = Path(args.json + ".partial")
    # cells are only comparable under the same data, subset, schedule and arms: a partial grid of
    # other settings is refused, not mixed in
    settings = {k: getattr(args, k) for k in RESUME_KEYS}
    done = {}
    if args.resume and partial.exists():
        saved = json.loads(partial.read_text())
        if not isinstance(saved, dict) or saved.get("settings") != settings:
            raise SystemExit(f"{partial}: written with other settings than this run; remove it or drop --resume")
        done = {(r["backbone"], r["optimizer"], r["lr"], r.get("seed", 0)): r for r in saved["runs"]}
    rows = []
    combos = list(itertools.product(args.backbones, args.optimizers, args.lrs, args.seeds))
    bar = tqdm(combos, desc="stability grid")
    for bb, opt, lr, seed in bar:
        if (bb, opt, lr, seed) in done:  # finished by an interrupted run with the same --json
            rows.append(done[(bb, opt, lr, seed)])
            continue
        bar.set_postfix_str(f"{bb} {opt} {lr:g} seed {seed}")
        cfg = json.loads(json.dumps(base))
        cfg["model"] = {"backbone": bb}
        cfg["train"].update({"optimizer": opt, "lr": lr, "seed": seed})
        row = {"backbone": bb, "optimizer": opt, "lr": lr, "seed": seed}
        for with_text in (False, True) if args.aligned and bb in args.aligned_backbones else (False,):
            cfg["alignment"] = {"enabled": with_text}
            with tempfile.TemporaryDirectory() as td:
                res = run_one(cfg, Path(td))
            net = res["net"].eval()
            card_acc = res["card"]["metrics"]["validation"]["accuracy"]
            plain = plain_accuracy(net, images[va], labels[va])
            assert abs(plain - card_acc) < 1e-6, f"split mismatch: {plain} vs card {card_acc}"
            head = aligned_accuracy(net, protos, images[tr], labels[tr], {"val": (images[va], labels[va])})["val"] \
                if args.aligned else None
            if with_text:
                row.update({"aligned_accuracy": head, "aligned_plain_head": plain, "aligned_seconds": res["seconds"]})
            else:
                row.update({"accuracy": plain, "seconds": res["seconds"],
                            "best_epoch": res["card"]["metrics"]["best_epoch"]})
                if head is not None:
                    row["posthoc_accuracy"] = head
        rows.append(row)
        tqdm.write(json.dumps(row))
        partial.write_text(json.dumps({"settings": settings, "runs": rows}, indent=1))  # see --resume
    return rows


def _write_subset(rows: list[dict], dest: Path, src: Path) -> Path:
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(parents=True, exist_ok=True)
    for r in rows:
        for col in ("image", "mask"):
            if r.get(col):
                (dest / r[col]).symlink_to(src / r[col])
    with open(dest / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return dest


def shift(args, protos, base: dict) -> list[dict]:
    """Train on some figshare views/batches, test on the rest; no-tumour images split by group."""
    from tumorlens.data.dataset import load_arrays
    from tumorlens.data.manifest import load_manifest

    src = Path(base["data"]["root"])
    with open(src / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    nt_groups = sorted({r["group"] for r in rows if r["label"] == "no_tumor"})
    nt_test = set(nt_groups[::3])
    men_groups = sorted({r["group"] for r in rows if r["label"] == "meningioma"})
    men_test = set(men_groups[::3])
    setups = {
        # same patients may appear in other views: this isolates the view, not the patient
        "view: train axial+coronal, test sagittal":
            lambda r: "test" if r["view"] == "sagittal" else "train",
        # acquisition batches are patient-disjoint; meningioma (one batch) split by patient
        "batch: hold out G3 (glioma) and P1 (pituitary)":
            lambda r: "test" if r["batch"] in ("G3", "P1") or r["group"] in men_test else "train",
    }
    out = []
    for name, rule in setups.items():
        part = {"train": [], "test": []}
        for r in rows:
            if r["label"] == "no_tumor":
                part["test" if r["group"] in nt_test else "train"].append(r)
            else:
                part[rule(r)].append(r)
        with tempfile.TemporaryDirectory() as td:
            td = Path(td)
            tr_root = _write_subset(part["train"], td / "train", src)
            te_root = _write_subset(part["test"], td / "test", src)
            cfg = json.loads(json.dumps(base))
            cfg["data"].update({"root": str(tr_root), "max_images": args.shift_max_images})
            cfg["model"] = {"backbone": args.shift_backbone}
            cfg["train"]["epochs"] = args.shift_epochs
            tr_man = load_manifest(tr_root)
            ti, _, tl = load_arrays(tr_man, args.size, progress=False)
            tr, va = split_like_train(tr_man, cfg["data"])
            te_man = load_manifest(te_root)
            xi, _, xl = load_arrays(te_man, args.size, progress=False)
            tumour = xl != CLASS_NAMES.index("no_tumor")
            sets = {"in_distribution_val": (ti[va], tl[va]), "held_out": (xi, xl),
                    "held_out_tumours": (xi[tumour], xl[tumour])}
            row = {"setup": name, "n_train": len(tr), "n_val": len(va), "n_test": int(len(xl))}
            # plain run (+ the post-hoc text head on its features); with --aligned also a run trained
            # with the alignment loss, read through the same head: the grid's three variants
            for with_text in (False, True) if args.aligned else (False,):
                cfg["alignment"] = {"enabled": with_text}
                res = run_one(cfg, td / ("aligned" if with_text else "plain"))
                net = res["net"].eval()
                head = aligned_accuracy(net, protos, ti[tr], tl[tr], sets)
                if with_text:
                    row["aligned"] = head
                else:
                    row["plain"] = {k: plain_accuracy(net, x, y) for k, (x, y) in sets.items()}
                    row["posthoc"] = head
                row["seconds"] = row.get("seconds", 0.0) + res["seconds"]
        for variant in ("plain", "posthoc", "aligned"):
            if variant in row:
                row[f"drop_{variant}"] = row[variant]["in_distribution_val"] - row[variant]["held_out"]
        tqdm.write(json.dumps(row))
        out.append(row)
    return out


VARIANTS = {"accuracy": "plain", "posthoc_accuracy": "posthoc", "aligned_accuracy": "aligned"}


def _variants(rows: list[dict], aligned: bool) -> dict:
    keys = ["accuracy"] + (["posthoc_accuracy", "aligned_accuracy"] if aligned else [])
    return {k: VARIANTS[k] for k in keys if any(k in r for r in rows)}


def table(rows: list[dict], aligned: bool) -> str:
    lines = []
    lrs = sorted({r["lr"] for r in rows})
    names = _variants(rows, aligned)
    for variant, vname in names.items():
        lines.append(f"\n{vname} — validation accuracy")
        lines.append(f"{'backbone':16s} {'optimizer':9s} " + " ".join(f"{'lr ' + format(lr, 'g'):>10s}" for lr in lrs))
        for bb in dict.fromkeys(r["backbone"] for r in rows):
            for opt in dict.fromkeys(r["optimizer"] for r in rows):
                cells = []
                for lr in lrs:  # the mean over training seeds when a cell was run with several
                    m = [r[variant] for r in rows
                         if (r["backbone"], r["optimizer"], r["lr"]) == (bb, opt, lr) and variant in r]
                    cells.append(f"{sum(m) / len(m):10.3f}" if m else f"{'-':>10s}")
                lines.append(f"{bb:16s} {opt:9s} " + " ".join(cells))
    lines.append(f"\n{'backbone':16s} " + " ".join(f"{n + ' best':>13s} {'worst':>6s} {'spread':>6s}"
                                                      for n in names.values()))
    for bb, s in spreads(rows, aligned).items():
        lines.append(f"{bb:16s} " + " ".join(f"{s[n]['best']:13.3f} {s[n]['worst']:6.3f} {s[n]['spread']:6.3f}"
                                             if n in s else f"{'-':>13s} {'-':>6s} {'-':>6s}" for n in names.values()))
    return "\n".join(lines)


def spreads(rows: list[dict], aligned: bool) -> dict:
    """Per backbone and variant: best, worst, spread and mean of the cells (optimiser x learning rate), each
    cell the mean over its training seeds; with several seeds also ``seed_spread``, the largest best - worst
    of one cell over its seeds: the spread that the seed alone makes, against which the grid's is read."""
    out = {}
    for bb in dict.fromkeys(r["backbone"] for r in rows):
        d = {}
        for key, name in _variants(rows, aligned).items():
            cells: dict = {}
            for r in rows:
                if r["backbone"] == bb and key in r:
                    cells.setdefault((r["optimizer"], r["lr"]), []).append(r[key])
            if not cells:
                continue
            v = [sum(c) / len(c) for c in cells.values()]
            d[name] = {"best": max(v), "worst": min(v), "spread": max(v) - min(v), "mean": sum(v) / len(v)}
            if any(len(c) > 1 for c in cells.values()):
                d[name]["seed_spread"] = max(max(c) - min(c) for c in cells.values())
                d[name]["seeds"] = max(len(c) for c in cells.values())
        out[bb] = d
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(shared_data_dir() / "brain-mri-2d"))
    p.add_argument("--backbones", default="densenet121,resnet18,efficientnet-b0")
    p.add_argument("--optimizers", default="adamw,sgd,rmsprop")
    p.add_argument("--lrs", default="0.0001,0.001,0.01")
    p.add_argument("--max-images", type=int, default=1600, help="fixed training subset size (validation: a quarter as many, >= 32)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aligned", action="store_true",
                   help="add the text-anchored variant of every run (trained with the alignment loss) and the post-hoc head")
    p.add_argument("--aligned-backbones", default=None,
                   help="comma-separated backbones that get the aligned arm (default: all of --backbones)")
    p.add_argument("--seeds", default="0",
                   help="training seeds, comma-separated: each cell is trained once per seed (the table and the spread "
                        "use the mean; seed_spread says how far one cell moves with the seed alone)")
    p.add_argument("--resume", action="store_true", help="reuse the cells already in JSON.partial")
    p.add_argument("--shift", action="store_true", help="add view / acquisition-batch hold-out runs")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--shift-backbone", default="densenet121")
    p.add_argument("--shift-max-images", type=int, default=1600)
    p.add_argument("--shift-epochs", type=int, default=4)
    p.add_argument("--init-from", default=None,
                   help="start every cell from this trained model (name or folder) instead of from scratch")
    p.add_argument("--frozen", default=None,
                   help="instead of training encoders: keep this trained model's encoder frozen and train only the "
                        "heads on it in every cell (Tip-Adapter's regime; its own grouped split, every image)")
    p.add_argument("--head-epochs", type=int, default=30, help="with --frozen: epochs of each head (as `tumorlens align`)")
    p.add_argument("--json", default="runs/stability.json")
    args = p.parse_args(argv)
    args.backbones = args.backbones.split(",")
    args.aligned_backbones = args.aligned_backbones.split(",") if args.aligned_backbones else args.backbones
    args.optimizers = args.optimizers.split(",")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    torch.set_num_threads(args.threads)
    base = {
        "data": {"root": args.data, "image_size": args.size, "val_fraction": 0.2, "seed": 0,
                 "max_images": args.max_images},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "patience": 1000,
                  "num_threads": args.threads, "seed": 0, "channels_last": True, "precision": args.precision},
    }
    if args.init_from:
        from tumorlens.models.registry import load_model

        init = load_model(args.init_from)
        other = [b for b in args.backbones if b != init.backbone]
        if other:
            raise SystemExit(f"--init-from {args.init_from} is a {init.backbone}: drop {', '.join(other)} from --backbones")
        dc = init.config.get("data", {})
        if (float(dc.get("val_fraction", 0.2)), int(dc.get("seed", 0))) != (0.2, 0):
            raise SystemExit(f"--init-from {args.init_from} was trained on another split: its validation part would leak")
        base["train"]["init_from"] = args.init_from
    protos = None
    if args.aligned or args.shift or args.frozen:
        from tumorlens.alignment.prompts import load_descriptions
        from tumorlens.alignment.text import build_prototypes

        protos = build_prototypes(load_descriptions())
    t0 = time.time()
    result: dict = {"config": {k: v for k, v in vars(args).items()}, "aligned_hyperparameters": FIXED}
    if args.frozen:
        rows = frozen_grid(args, protos)
        result.update({"runs": rows, "spread": spreads(rows, True)})
        print(table(rows, True))
    elif not args.no_grid:
        rows = grid(args, protos, base)
        result["runs"] = rows
        result["spread"] = spreads(rows, args.aligned)
        print(table(rows, args.aligned))
    if args.shift:
        result["shift"] = shift(args, protos, base)
        print("\nshift (accuracy: in-distribution val -> held out (drop); held-out tumour images only)")
        for r in result["shift"]:
            print(r["setup"])
            for v in ("plain", "posthoc", "aligned"):
                if v in r:
                    a = r[v]
                    print(f"  {v:8s} {a['in_distribution_val']:.3f} -> {a['held_out']:.3f} "
                          f"(drop {r['drop_' + v]:+.3f}); tumours {a['held_out_tumours']:.3f}")
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['seconds']:.0f} s; json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
