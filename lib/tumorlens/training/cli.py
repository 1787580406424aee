"""``tumorlens train --config configs/train/<name>.yaml``, ``tumorlens train-refiner`` and ``train-window``."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("train", help="train a dual-head network from a YAML config")
    p.add_argument("--config", required=True, help="configs/train/<name>.yaml")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--out", help="override the output model folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model already in the output folder (and its refiner, window classifier, text head)")
    p.set_defaults(func=run)
    _companion_parser(sub, "train-refiner", "train the lesion refiner of a trained model (redraws the seg head's "
                      "lesion at the slice's resolution; stored only if it raises seg Dice)", 24, "refiner.pt",
                      run_refiner)
    w = _companion_parser(sub, "train-window", "train the lesion-window classifier of a trained model (a second "
                          "opinion on the tumour type from the lesion's window; its fusion fitted on validation; stored "
                          "only if the fused decision, refitted without each patient group, is more accurate)", 40, "window_classifier.pt", run_window)
    w.add_argument("--seed", type=int, default=0, help="the first member's seed (the next ones count on)")
    w.add_argument("--members", type=int, default=3, help="networks from successive seeds whose mean decides")
    w.add_argument("--scales", default="1", help="window sizes as multiples of the lesion window, one input "
                                                 "channel each (e.g. 1,2 adds twice the surroundings)")


def _companion_parser(sub, name: str, help: str, epochs: int, file: str, func):
    """The options every companion network's training command takes."""
    c = sub.add_parser(name, help=help)
    c.add_argument("--model", help="model name or folder (default: the shipped model)")
    c.add_argument("--data", help="manifest folder (default: ../shared/data/brain-mri-2d); the model's grouped "
                                  "split of it is used")
    c.add_argument("--epochs", type=int, default=epochs)
    c.add_argument("--max-images", type=int, help="a fixed subset of each part (smoke runs)")
    c.add_argument("--no-save", action="store_true", help=f"measure only; never write {file}")
    c.add_argument("--json", help="write the training and validation record here")
    c.set_defaults(func=func)
    return c


def run(args) -> int:
    from tumorlens.config import load_yaml
    from tumorlens.training.train import train

    cfg = load_yaml(args.config) or {}
    if args.epochs is not None:
        cfg.setdefault("train", {})["epochs"] = args.epochs
    if args.out:
        cfg.setdefault("output", {})["dir"] = args.out
    if args.overwrite:
        cfg.setdefault("output", {})["overwrite"] = True
    res = train(cfg, source=args.config)
    card = res["card"]
    print(json.dumps({"model": res["path"], "validation": {k: v for k, v in card["metrics"]["validation"].items()
                                                           if k != "per_class"},
                      "duration_s": card["training"]["duration_s"]}, indent=2))
    return 0


def run_refiner(args) -> int:
    from tumorlens.training.refiner import train_refiner

    return _run_companion(args, train_refiner)


def run_window(args) -> int:
    from tumorlens.training.window import train_window

    if args.members < 1:
        raise SystemExit("--members must be at least 1")
    return _run_companion(args, train_window, seed=args.seed, scales=_scales(args.scales), members=args.members)


def _run_companion(args, train, **extra) -> int:
    """A companion network's training command: checks before work, then the validation figures it was
    judged on and whether it was stored."""
    from tumorlens.evaluation.cli import check_output
    from tumorlens.evaluation.jsonio import dumps

    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    if args.json:
        check_output(args.json)
    rec = train(args.model, args.data, epochs=args.epochs, max_images=args.max_images, save=not args.no_save,
                json_out=args.json, **extra)
    print(dumps({"validation": rec["validation"], "stored": rec["stored"],
                 "duration_s": rec["training"]["duration_s"]}))
    return 0


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"--scales {text!r}: comma-separated numbers, e.g. 1,2") from None
    if not scales or any(s <= 0 for s in scales):
        raise SystemExit(f"--scales {text!r}: at least one positive number")
    return scales
