"""``tumorlens train --config configs/train/<name>.yaml``."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("train", help="train a dual-head network from a YAML config")
    p.add_argument("--config", required=True, help="configs/train/<name>.yaml")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--out", help="override the output model folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from tumorlens.config import load_yaml
    from tumorlens.training.train import train

    cfg = load_yaml(args.config)
    if args.epochs:
        cfg.setdefault("train", {})["epochs"] = args.epochs
    if args.out:
        cfg.setdefault("output", {})["dir"] = args.out
    res = train(cfg)
    card = res["card"]
    print(json.dumps({"model": res["path"], "validation": {k: v for k, v in card["metrics"]["validation"].items()
                                                           if k != "per_class"},
                      "duration_s": card["training"]["duration_s"]}, indent=2))
    return 0
