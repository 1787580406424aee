"""``tumorlens align``, ``tumorlens ablate-prompts``, ``tumorlens retrieve`` and ``tumorlens familiarity``."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("align", help="fit the text-anchored head (prototypes + Tip-Adapter) of a trained model")
    _common(p)
    p.add_argument("--no-save", action="store_true", help="measure only; never write alignment.pt / text_probe.pt")
    p.add_argument("--no-ablation", action="store_true", help="skip the prompt ablation")
    p.set_defaults(func=run_align)

    p = sub.add_parser("ablate-prompts", help="how much accuracy/predictions change when the descriptions are edited")
    _common(p)
    p.set_defaults(func=run_ablate)

    p = sub.add_parser("retrieve", help="find images by text; without queries: the negation retrieval benchmark")
    p.add_argument("queries", nargs="*", help="free-text queries, e.g. 'MRI without any tumour' (negations scored contrastively)")
    p.add_argument("--data", help="dataset folder (manifest.csv) to search; default: the model's validation split")
    p.add_argument("--model", help="model name or path (default: configs/defaults.yaml)")
    p.add_argument("--k", type=_positive, default=5, help="results per query")
    p.add_argument("--head", choices=("auto", "aligned", "probe"), default="auto")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--max-images", type=_positive, help="cap the split (quick runs)")
    p.set_defaults(func=run_retrieve)

    p = sub.add_parser("familiarity", help="fit the layer statistics of the familiarity check on the model's split")
    p.add_argument("--model", help="model name or path (default: configs/defaults.yaml)")
    p.add_argument("--no-save", action="store_true", help="measure only; never write layer_statistics.pt")
    p.add_argument("--json", help="write the fit's summary here (default: runs/alignment/familiarity-<model>.json)")
    p.set_defaults(func=run_familiarity)


def _common(p) -> None:
    p.add_argument("--model", help="model name or path (default: configs/defaults.yaml)")
    p.add_argument("--prompts", help="class descriptions YAML (default: configs/prompts/classes.yaml)")
    p.add_argument("--max-images", type=_positive, help="cap the training split (quick development runs; never saves)")
    p.add_argument("--json", help="write the full results here (default: runs/alignment/<command>-<model>.json)")


def _positive(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


def _write(obj: dict, path: str | None, default_name: str) -> Path:
    """Strict JSON (an undefined metric is null) at ``path`` or ``runs/alignment/<default_name>``."""
    from tumorlens.evaluation.jsonio import json_ready, write_json
    from tumorlens.paths import project_root

    out = Path(path) if path else project_root() / "runs" / "alignment" / default_name
    return write_json(json_ready(json.loads(json.dumps(obj, default=str))), out)


def _check_outputs(args) -> None:
    """Before minutes of feature extraction: the --json path and the prompt file must be usable."""
    from tumorlens.evaluation.cli import check_output

    if getattr(args, "json", None):
        check_output(args.json)
    if getattr(args, "prompts", None):
        from tumorlens.alignment.prompts import load_descriptions

        load_descriptions(args.prompts)


def run_align(args) -> int:
    from tumorlens.alignment.experiment import run_alignment
    from tumorlens.models.registry import version_label

    _check_outputs(args)

    r = run_alignment(args.model, prompts=args.prompts, max_images=args.max_images, save=not args.no_save,
                      ablation=not args.no_ablation)
    out = _write(r, args.json, f"align-{r['model']['name']}.json")
    print(f"model {r['model']['name']} {version_label(r['model']['version'])}  train {r['data']['n_train']}  val {r['data']['n_val']}")
    print(f"{'variant':28s} {'acc':>6s} {'tumour':>7s} {'bal':>6s} {'xfit':>6s}  alpha beta gamma")
    pl = r["plain"]
    print(f"{'plain classifier':28s} {pl['accuracy']:6.3f} {pl['tumour_only_accuracy']:7.3f} {pl['balanced_accuracy']:6.3f}")
    for name, v in r["aligned"].items():
        print(f"{'aligned/' + name:28s} {v['accuracy']:6.3f} {v['tumour_only_accuracy']:7.3f} "
              f"{v['balanced_accuracy']:6.3f} {v['crossfit_accuracy']:6.3f}  {v['alpha']:5.2f} {v['beta']:4.1f} {v['gamma']:5.2f}")
    print("semantic margin rate: " + ", ".join(f"{k} {v:.3f}" for k, v in r["semantic_margin_rate"].items()))
    if r["prompt_ablation"]:
        _print_ablation(r["prompt_ablation"])
    for head, nr in r["negation_retrieval"].items():
        print(f"retrieval {head:12s} affirmative P@k {nr['affirmative']['precision_at_k']:.3f} (baselined "
              f"{nr['affirmative_baselined']['precision_at_k']:.3f})  negated P@k "
              f"{nr['negated']['direct']['precision_at_k']:.3f} (negation-aware "
              f"{nr['negated']['negation_aware']['precision_at_k']:.3f})")
    d = r["decision"]
    print(f"aligned default: {d['aligned_default']}  saved: {d['saved'] or 'nothing'}")
    print(f"json: {out}")
    return 0


def _print_ablation(abl: dict) -> None:
    print(f"{'fusion':10s} {'prompts':8s} {'frozen acc':>10s} {'changed':>8s} {'refit acc':>10s} {'changed':>8s}")
    for fusion, res in abl.items():
        print(f"{fusion:10s} {'true':8s} {res['true']['accuracy']:10.3f}")
        for k, v in res.items():
            if k in ("true", "decorative"):
                continue
            print(f"{fusion:10s} {k:8s} {v['frozen']['accuracy']:10.3f} {v['frozen']['changed']:8.3f} "
                  f"{v['refit']['accuracy']:10.3f} {v['refit']['changed']:8.3f}")
        if res.get("decorative"):
            print(f"{fusion}: prototypes are DECORATIVE (< 0.5 % of predictions change)")


def run_ablate(args) -> int:
    from tumorlens.alignment.experiment import prompt_ablation
    from tumorlens.alignment.features import split_features
    from tumorlens.alignment.head import classifier_layer
    from tumorlens.alignment.prompts import load_descriptions
    from tumorlens.models import load_model

    _check_outputs(args)

    m = load_model(args.model)
    split = split_features(m, max_images=args.max_images)
    abl = prompt_ablation(split, classifier_layer(m.net), load_descriptions(args.prompts))
    _print_ablation(abl)
    print(f"json: {_write(abl, args.json, f'ablate-prompts-{m.name}.json')}")
    return 0


def run_retrieve(args) -> int:
    import numpy as np

    _check_outputs(args)

    from tumorlens.alignment.api import text_head
    from tumorlens.alignment.features import extract_features, split_features
    from tumorlens.alignment.retrieval import negation_retrieval, query_scores
    from tumorlens.models import load_model

    empty = [q for q in args.queries if not q.strip()]
    if empty:
        from tumorlens.errors import InvalidInputError

        raise InvalidInputError(None, "a query is empty: give the words to search for")
    m = load_model(args.model)
    head, kind = text_head(m, args.head)
    if args.data:
        from tumorlens.data.dataset import load_arrays
        from tumorlens.data.manifest import load_manifest

        man = load_manifest(args.data)
        if args.max_images and len(man) > args.max_images:  # a spread, repeatable subset (it was ignored here)
            man = man.subset(np.linspace(0, len(man) - 1, args.max_images).round().astype(int).tolist())
        images, _, labels = load_arrays(man, m.image_size)
        feats, _ = extract_features(m.net, images, progress=True)
        names = [str(r.image.relative_to(man.root)) for r in man.records]
    else:
        split = split_features(m, max_images=args.max_images)
        feats, labels = split["val_f"], split["val_y"]
        names = [str(split["manifest"].records[i].image.relative_to(split["manifest"].root)) for i in split["val_idx"]]
    t = head.text_vectors(feats).numpy()
    if not args.queries:
        res = negation_retrieval(t, labels)
        res["head"] = kind
        print(f"head {kind}: affirmative P@k {res['affirmative']['precision_at_k']:.3f} (against the brain-MRI "
              f"baseline {res['affirmative_baselined']['precision_at_k']:.3f}), negated P@k "
              f"{res['negated']['direct']['precision_at_k']:.3f} (negation-aware "
              f"{res['negated']['negation_aware']['precision_at_k']:.3f})")
        for q in res["queries"]:
            print(f"  {'NEG' if q['negated'] else '   '} {q['query']:40s} P@{q['k']} {q['direct']['precision_at_k']:.3f}"
                  f"  aware {q['negation_aware']['precision_at_k']:.3f}")
        print(f"json: {_write(res, args.json, f'retrieve-{m.name}.json')}")
        return 0
    from tumorlens.labels import CLASS_NAMES

    out = {"head": kind, "searched": len(names), "results": {}}
    from tumorlens.alignment.retrieval import RELEVANCE_MIN, query_relevance

    for text in args.queries:
        s = query_scores(t, text)
        top = np.argsort(-s)[: args.k]
        out["results"][text] = [{"image": names[i], "label": CLASS_NAMES[int(labels[i])], "similarity": float(s[i])}
                                for i in top]
        relevance = query_relevance(text)
        out.setdefault("relevance", {})[text] = round(relevance, 4)
        print(text)
        if relevance < RELEVANCE_MIN:
            warning = (f"the query is unlike every class description (best similarity {relevance:.2f} < {RELEVANCE_MIN}): "
                       "the text model reads English radiology phrases, so this ranking means little")
            out.setdefault("warnings", {})[text] = warning
            print(f"  WARNING: {warning}")
        for r in out["results"][text]:
            print(f"  {r['similarity']:.3f}  {r['label']:11s} {r['image']}")
    if args.json:
        _write(out, args.json, "")
    return 0


def run_familiarity(args) -> int:
    from tumorlens.alignment.layer_statistics import FILE, fit_for_model
    from tumorlens.models import load_model
    from tumorlens.models.registry import version_label

    _check_outputs(args)
    m = load_model(args.model)
    stats = fit_for_model(m)
    saved = None if args.no_save else str(stats.save(Path(m.path) / FILE))
    r = {"model": {"name": m.name, "version": m.version}, "threshold": stats.threshold, **stats.meta,
         "stage_medians": stats.scale, "saved": saved}
    out = _write(r, args.json, f"familiarity-{m.name}.json")
    print(f"model {m.name} {version_label(m.version)}  train {stats.meta['n_train']}  val {stats.meta['n_val']}")
    print(f"layer score: validation median {stats.meta['validation_median']:.3f}, threshold {stats.threshold:.3f} "
          f"(the {1 - stats.meta['quantile']:.0%} quantile; stages {stats.meta['stages']}, "
          f"{stats.meta['components']} directions each)")
    print(f"saved: {saved or 'nothing'}\njson: {out}")
    return 0
