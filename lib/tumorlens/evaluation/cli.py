"""``tumorlens evaluate DATA_DIR`` and ``tumorlens predict IMAGE``."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a model on any manifest folder (table, JSON, confusion PNG)")
    p.add_argument("data_dir")
    p.add_argument("--model", default=None, help="registered model name or checkpoint path (default: shipped model)")
    p.add_argument("--json", dest="json_out", default=None, help="write metrics JSON here")
    p.add_argument("--png", default=None, help="confusion-matrix PNG (default: next to --json, or ./confusion.png)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--no-margin", action="store_true", help="skip the semantic margin rate")
    p.set_defaults(func=run_evaluate)

    q = sub.add_parser("predict", help="classify images (and segment the tumour) with the shipped model")
    q.add_argument("images", nargs="+", help="JPEG/PNG/BMP/TIFF slices, NIfTI/NRRD/MetaImage volumes, DICOM files or "
                                             "series folders")
    q.add_argument("--model", default=None, help="a registered model name or a model folder (default: the shipped one)")
    q.add_argument("--json", dest="json_out", default=None, help="write every answer (probabilities, caveats, ...) "
                                                                 "to this JSON file")
    q.set_defaults(func=run_predict)
    register_volumes(sub)


def check_output(path: str | Path) -> Path:
    """Refuse an output file that cannot be written before any work is done: a run of minutes must not
    end in a traceback because ``--json`` points below a regular file or at a folder."""
    import os

    from tumorlens.errors import InvalidInputError

    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(path, "output path is a folder, not a file name")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(path, f"cannot write here: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InvalidInputError(path, f"cannot write here: folder {parent} is not writable")
            break
    return path


def run_evaluate(args) -> int:
    from tumorlens.evaluation.evaluate import confusion_png, evaluate_folder, format_table
    from tumorlens.evaluation.jsonio import write_json

    png = Path(args.png) if args.png else (Path(args.json_out).with_suffix(".confusion.png") if args.json_out
                                            else Path("confusion.png"))
    for out in ([args.json_out] if args.json_out else []) + [png]:
        check_output(out)
    m = evaluate_folder(args.data_dir, model=args.model, limit=args.limit)
    probs, labels = m.pop("_probs"), m.pop("_labels")
    if args.no_margin:
        for k in ("semantic_margin_rate", "semantic_margin_rate_network", "semantic_margin_n", "semantic_margin_head"):
            m.pop(k, None)
    elif m.get("semantic_margin_rate") is None:  # no aligned head: the plain model through its text probe
        probe = _margin(args, m, probs, labels) or {}
        # its count and head with it: a plain model's rate had come with semantic_margin_n 0 (session 39 audit)
        m.update(semantic_margin_rate=probe.get("rate"), semantic_margin_n=probe.get("n", 0),
                 semantic_margin_head=probe.get("head"))
    confusion_png(m, png)
    m["confusion_png"] = str(png)
    print(format_table(m))
    if m.get("semantic_margin_rate") is not None:
        alone = m.get("semantic_margin_rate_network")
        print(f"semantic margin rate {m['semantic_margin_rate']:.4f}"
              + (f" (the aligned head's vector alone, before the window classifier joined it: {alone:.4f})"
                 if alone is not None else ""))
    print(f"confusion matrix: {png}")
    if args.json_out:
        write_json(m, args.json_out)
        print(f"metrics: {args.json_out}")
    return 0


def _margin(args, m, probs, labels):
    """Semantic margin rate of a model without an aligned head: its linear text probe (issue 8)."""
    try:
        from tumorlens.alignment import semantic_margin_for_folder
    except ImportError:
        return None
    return semantic_margin_for_folder(args.data_dir, model=args.model, limit=args.limit, details=True)


def run_predict(args) -> int:
    """Classify each image; a file that cannot be read is reported and skipped (exit status 1)."""
    import sys

    from tumorlens.data.readers import read_image
    from tumorlens.errors import InvalidInputError
    from tumorlens.inference import Predictor

    if args.json_out:
        check_output(args.json_out)  # before the images are classified, not after
    pred = Predictor(args.model)
    out, failed = [], 0
    for path in args.images:
        try:
            r = pred.predict(read_image(path))
        except Exception as e:  # noqa: BLE001 - one bad file must not cost the batch its other results
            problem = e.problem if isinstance(e, InvalidInputError) else f"could not be read ({type(e).__name__}: {e})"
            failed += 1
            out.append({"file": Path(path).name, "error": problem})
            print(f"{Path(path).name:<28} ERROR: {problem}", file=sys.stderr)
            continue
        tumour_px = int(r.mask.sum())
        fam = r.extra.get("familiarity")
        rec = {"file": Path(path).name, "label": r.label,
               "probabilities": {k: round(v, 4) for k, v in r.probabilities.items()},
               "mask_pixels": tumour_px, "familiarity": fam, "caveats": r.caveats, "model": r.extra.get("model")}
        # what the server's answers carry too (the README names them "in the prediction"): the coarse fit to the
        # head template (volumes), the lesion-window classifier's opinion, the similarities to the class
        # descriptions and how dark a picture's frame is
        for key in ("head_template_dice", "window_classifier", "text_similarities", "dark_border_fraction"):
            if r.extra.get(key) is not None:
                rec[key] = r.extra[key]
        out.append(rec)
        probs = "  ".join(f"{k}={v:.3f}" for k, v in r.probabilities.items())
        flag = "" if fam is None else ("" if fam["familiar"] else "  UNFAMILIAR")
        print(f"{Path(path).name:<28} {r.label:<11} {probs}  mask={tumour_px}px{flag}")
        window = r.extra.get("window_classifier")
        if window is not None and window["changed_label"]:
            net = window["network_probabilities"]
            first = max(net, key=net.get)
            print(f"{'':<28} tumour type: the whole-slice network favoured {first} ({net[first]:.3f}); the "
                  f"lesion-window classifier's opinion ({', '.join(f'{k}={v:.3f}' for k, v in window['probabilities'].items())}) "
                  f"changed it")
        for c in rec["caveats"]:
            print(f"{'':<28} caveat: {c}")
    if args.json_out:
        from tumorlens.evaluation.jsonio import write_json

        write_json(out, args.json_out)
    return 1 if failed else 0


def register_volumes(sub) -> None:
    p = sub.add_parser("evaluate-volumes",
                       help="volume Dice of the 2D seg head run slice-wise on 3D cases (e.g. BraTS)")
    p.add_argument("data_dir", help="folder of case folders, each with an image and a label volume")
    p.add_argument("--image", default="T1c*.nii*", help="glob of the image inside a case folder")
    p.add_argument("--label", default="OTMultiClass*.nii*", help="glob of the tumour labels (> 0 is tumour)")
    p.add_argument("--core", default="", help="label values of a tumour core to score as well, e.g. 1,3,4")
    p.add_argument("--model", default=None)
    p.add_argument("--json", dest="json_out", default=None)
    p.set_defaults(func=run_volumes)


def run_volumes(args) -> int:
    from tumorlens.evaluation.volumes import evaluate_volumes

    core = tuple(int(v) for v in args.core.split(",") if v.strip())
    res = evaluate_volumes(args.data_dir, args.image, args.label, model=args.model, core_labels=core)
    print(f"{'case':<10}{'Dice':>8}{'pred vox':>10}{'true vox':>10}  label (p)")
    for c in res["cases"]:
        print(f"{c['case']:<10}{c['dice']:>8.3f}{c['pred_voxels']:>10}{c['true_voxels']:>10}  "
              f"{c['label']} ({c['probabilities'][c['label']]:.2f})")
    print(f"mean volume Dice {res['mean_dice']:.3f} over {len(res['cases'])} volumes (labels > 0)")
    if core:
        print(f"mean tumour-core Dice {res['mean_core_dice']:.3f} (labels {args.core})")
    if args.json_out:
        from tumorlens.evaluation.jsonio import write_json

        write_json(res, args.json_out)
    return 0
