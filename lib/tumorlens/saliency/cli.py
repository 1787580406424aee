"""``tumorlens explain IMAGE --out DIR`` and ``tumorlens evaluate-saliency DATA_DIR``."""

from __future__ import annotations

import json

METHOD_CHOICES = ("gradcam", "gradcampp", "scorecam")


def register(sub) -> None:
    p = sub.add_parser("explain", help="saliency map, adaptive lesion mask, atlas regions and findings of one image")
    p.add_argument("image", help="JPEG/PNG, NIfTI or DICOM file (or DICOM series folder)")
    p.add_argument("--method", default=None, choices=(*METHOD_CHOICES, "all"),
                   help="default: tumorlens.saliency.explain.PRIMARY (Grad-CAM, the best measured)")
    p.add_argument("--model", default=None, help="model name or path (default: configs/defaults.yaml)")
    p.add_argument("--out", required=True, help="output folder (findings.json, mask/heatmap NIfTI, mask.seg.nrrd, PNGs)")
    p.add_argument("--no-regions", action="store_true", help="skip the atlas placement")
    p.add_argument("--layer", default=None, help="hooked layer (default: the network's cam_layer)")
    p.add_argument("--age", type=int, default=None, help="patient age in years (findings.patient; optional)")
    p.add_argument("--sex", default=None, choices=("F", "M", "O"), help="patient sex (findings.patient; optional)")
    p.add_argument("--history", default=None,
                   help="clinical history in English, no names or numbers that identify the patient (findings.patient)")
    p.set_defaults(func=run_explain)

    e = sub.add_parser("evaluate-saliency", help="pointing game, Dice/IoU and deletion AUC of each saliency method")
    e.add_argument("data_dir", help="folder with manifest.csv (tumour images with masks are used)")
    e.add_argument("--methods", default=",".join(METHOD_CHOICES), help="comma-separated: gradcam,gradcampp,scorecam")
    e.add_argument("--n", type=int, default=40, help="number of images, spread over the manifest (default 40)")
    e.add_argument("--model", default=None)
    e.add_argument("--json", dest="json_out", default=None, help="write the full results here")
    e.add_argument("--overlays", default=None, help="folder for overlay PNGs of a sample")
    e.add_argument("--n-overlays", type=int, default=8)
    e.add_argument("--layer", default=None, help="hooked layer (default: the network's cam_layer)")
    e.add_argument("--deletion-steps", type=int, default=None,
                   help="steps of the deletion curve (default 10; 0 skips it: pointing game and overlap only, ~10x faster)")
    e.set_defaults(func=run_evaluate)


def _methods(text: str) -> tuple[str, ...]:
    from tumorlens.errors import InvalidInputError

    ms = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in ms if m not in METHOD_CHOICES]
    if bad or not ms:
        raise InvalidInputError(None, f"unknown saliency method(s) {bad or text!r}; choose from {', '.join(METHOD_CHOICES)}")
    return ms


def run_explain(args) -> int:
    from tumorlens.saliency.explain import PRIMARY, explain

    patient = {k: v for k, v in (("age", args.age), ("sex", args.sex), ("clinical_history", args.history))
               if v is not None} or None
    if patient:  # checked before the (seconds-long) pipeline runs
        from tumorlens.findings.schema import check_patient

        patient = check_patient(patient, source="--age/--sex/--history")
    expl = explain(args.image, method=args.method or PRIMARY, model=args.model, with_regions=not args.no_regions,
                   layer=args.layer, patient=patient)
    files = expl.write(args.out)
    f = expl.findings
    c = f.classification
    print(f"{f.input.file}: {c.label} (p={c.probabilities[c.label]:.2f}, entropy {c.uncertainty.entropy:.2f})")
    for m in f.masks:
        if m.volume_mm3 is not None:
            size = f"{m.volume_mm3 / 1000:.1f} ml"
        elif f.input.spacing_known and m.area_mm2 is not None:
            size = f"{m.area_mm2:.0f} mm2"
        else:  # a JPEG/PNG has no pixel size: its area in mm2 would be invented
            size = f"{m.voxels} px (pixel size unknown)"
        print(f"  mask {m.source}: {'empty' if m.empty else size}")
    for r in f.regions[:5]:
        print(f"  region {r.label} ({r.hemisphere} {r.name}): {r.fraction:.0%}")
    for note in f.notes:
        print(f"  note: {note}")
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
    return 0


def run_evaluate(args) -> int:
    from tumorlens.saliency.evaluate import DELETION_STEPS, evaluate_saliency

    steps = DELETION_STEPS if args.deletion_steps is None else args.deletion_steps
    res = evaluate_saliency(args.data_dir, methods=_methods(args.methods), n=args.n, model=args.model,
                            overlays_dir=args.overlays, n_overlays=args.n_overlays, layer=args.layer, steps=steps)
    print(f"{res['n_images']} tumour images of {res['data']}, model {res['model']['name']} {res['model']['version']}, "
          f"layer {res['layer']}")
    print(f"{'method':<11}{'pointing':>9}{'Dice':>7}{'IoU':>7}{'deletion':>10}{'moved':>7}{'faster':>8}{'pctl':>7}"
          f"{'s/img':>7}")
    for m, s in res["methods"].items():
        d = f"{s['deletion_auc']:.3f}" if s["deletion_auc"] is not None else "-"
        mv = f"{s['deletion_auc_moved']:.3f}" if s.get("deletion_auc_moved") is not None else "-"
        fa = f"{s['deletion_faster_than_moved']:.2f}" if s.get("deletion_faster_than_moved") is not None else "-"
        print(f"{m:<11}{s['pointing_game']:>9.3f}{s['dice']:>7.3f}{s['iou']:>7.3f}{d:>10}{mv:>7}{fa:>8}"
              f"{s['percentile_mean']:>7.1f}{s['seconds_per_image']:>7.2f}")
    print(f"{'seg head':<11}{'':>9}{res['segmentation_head']['dice']:>7.3f}")
    tol = res["pointing_tolerance_px"]
    for m, s in res["methods"].items():
        per_class = ", ".join(f"{c} {v:.3f}" for c, v in s["pointing_game_per_class"].items())
        miss = s["miss_distance_px_median"]
        print(f"{m} pointing by class: {per_class}; within {tol} px: {s['pointing_game_tolerant']:.3f}"
              + (f"; misses' median distance {miss:.0f} px" if miss is not None else ""))
    if res.get("random_deletion_auc") is not None:
        print(f"deletion AUC (lower: the class probability falls sooner): 'moved' deletes the same map moved by half "
              f"the image (the fair floor; 'faster': share of images below it); a random pixel order gives "
              f"{res['random_deletion_auc']:.3f}, a harsher perturbation than any contiguous map")
    if "gradcampp_vs_gradcam" in res:
        g = res["gradcampp_vs_gradcam"]
        d = round(g["dice_difference"], 3)
        verdict = "ties with" if d == 0 else "beats" if d > 0 else "does not beat"
        print(f"Grad-CAM++ vs Grad-CAM: Dice {g['dice_difference']:+.3f}, pointing {g['pointing_difference']:+.3f} "
              f"-> Grad-CAM++ {verdict} Grad-CAM on overlap")
    if args.json_out:
        from tumorlens.evaluation.jsonio import write_json

        write_json(res, args.json_out)
    return 0
