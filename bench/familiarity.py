"""Familiarity of the shipped model on in- and out-of-distribution inputs: the k-NN similarity and the layer
score (``tumorlens familiarity``) of the grouped validation images (what the threshold was set on) beside real images the model was not trained
for: CT and MR test slices inside pydicom (a CT also gets the modality caveat), scikit-image's photographs and micrographs, and the BraTS
volumes (T1c: the training sequence from another scanner; FLAIR: a sequence never seen).

    .venv/bin/python bench/familiarity.py [--json OUT]

Prints a table and writes JSON (default ``bench/results/familiarity.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "2")

# two head CT slices and a small body CT (liver_1frame.dcm, once listed here, is a binary DICOM SEG mask)
PYDICOM_FILES = ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm")
SKIMAGE_IMAGES = ("camera", "astronaut", "coins", "moon", "brick", "text", "chelsea", "shepp_logan_phantom",
                  "grass", "page", "clock", "horse", "retina", "cell", "hubble_deep_field", "immunohistochemistry")


def _skimage_files(tmp: Path) -> list[tuple[str, Path]]:
    """scikit-image's bundled images written as PNG as they come (grey or colour, 8 bit), so they go through the
    same reader as any user file."""
    import skimage.data
    from PIL import Image

    out = []
    for name in SKIMAGE_IMAGES:
        try:
            a = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - an image not bundled in this scikit-image is skipped, and said so
            print(f"skip skimage/{name}: {e}")
            continue
        a = a[..., :3] if a.ndim == 3 else a
        a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
        p = tmp / f"{name}.png"
        Image.fromarray(a).save(p)
        out.append((f"skimage/{name}", p))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/familiarity.json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import tempfile

    import torch
    from pydicom.data import get_testdata_file
    from tqdm import tqdm

    from tumorlens.alignment.familiarity import knn_similarity
    from tumorlens.alignment.features import split_features
    from tumorlens.caveats import DARK_BORDER_MIN, IN_COLOUR, NO_DARK_BORDER
    from tumorlens.data import load_manifest, read_image
    from tumorlens.data.normalize import dark_border_fraction
    from tumorlens.inference import Predictor
    from tumorlens.paths import shared_data_dir

    torch.set_num_threads(2)
    pred = Predictor()
    cal = pred.familiarity_calibration
    if cal is None:
        raise SystemExit("the shipped model has no familiarity calibration: run `tumorlens align`")
    sf = split_features(pred.model, progress=True)
    val = knn_similarity(pred.aligned_head.cache, sf["val_f"], cal["k"])
    stats = pred.layer_statistics  # the second measure (``tumorlens familiarity``), if the model carries it
    if stats is not None:
        from tumorlens.alignment.layer_statistics import extract_stage_features, unfamiliar_layers
        from tumorlens.data.dataset import load_arrays

        images, _m, _y = load_arrays(sf["manifest"], pred.size, progress=False)
        val_layers = stats.scores(extract_stage_features(pred.model.net, images[sf["val_idx"]], progress=True))
        val_either = (val < cal["threshold"]) | unfamiliar_layers(val_layers, stats.threshold)
    # the dark-border caveat's threshold against every development slice, read as a user's file is
    dev = np.array([dark_border_fraction(np.squeeze(read_image(r.image).numpy()[0]))
                    for r in tqdm(load_manifest(shared_data_dir() / "brain-mri-2d").records, desc="dark border")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [(f"pydicom/{n}", Path(get_testdata_file(n))) for n in PYDICOM_FILES if get_testdata_file(n)]
        inputs += _skimage_files(Path(tmp))
        brats = shared_data_dir() / "brats-3d"
        for pat in sorted(p for p in brats.iterdir() if p.is_dir()) if brats.is_dir() else []:
            for seq in ("T1c", "Flair"):
                inputs += [(f"brats/{pat.name}/{f.name}", f) for f in sorted(pat.glob(f"{seq}*.nii*"))]
        for name, path in tqdm(inputs, desc="inputs"):
            r = pred.predict(read_image(path))
            f = r.extra["familiarity"]
            rows.append({"input": name, "score": f["score"], "layer_score": f.get("layer_score"),
                         "familiar": f["familiar"], "label": r.label,
                         "p": round(r.probabilities[r.label], 3), "dark_border": r.extra.get("dark_border_fraction"),
                         "caveats": r.extra.get("caveats", [])})
    res = {"model": {"name": pred.model.name, "version": pred.model.version}, "calibration": cal,
           "validation": {"n": int(val.size), "flagged": int((val < cal["threshold"]).sum()),
                          "flagged_fraction": float((val < cal["threshold"]).mean()),
                          "median": float(np.median(val)), "min": float(val.min())},
           "layer_statistics": None if stats is None else {
               "threshold": stats.threshold, "meta": stats.meta, "flagged": int(unfamiliar_layers(val_layers, stats.threshold).sum()),
               "median": float(np.median(val_layers)), "max": float(val_layers.max()),
               "flagged_either": int(val_either.sum()), "flagged_either_fraction": float(val_either.mean())},
           "development_dark_border": {"n": int(dev.size), "threshold": DARK_BORDER_MIN, "min": float(dev.min()),
                                       "q01": float(np.quantile(dev, 0.01)), "below": int((dev < DARK_BORDER_MIN).sum())},
           "inputs": rows}
    v = res["validation"]
    print(f"threshold {cal['threshold']:.3f} (k={cal['k']}, {100 * cal['quantile']:.0f} % quantile of grouped validation)")
    print(f"validation: {v['flagged']} of {v['n']} flagged ({100 * v['flagged_fraction']:.1f} %), median {v['median']:.3f}")
    ls = res["layer_statistics"]
    if ls:
        print(f"layer score: threshold {ls['threshold']:.3f}; validation median {ls['median']:.3f}, {ls['flagged']} of "
              f"{v['n']} above; flagged by either measure: {ls['flagged_either']} ({100 * ls['flagged_either_fraction']:.1f} %)")
    d = res["development_dark_border"]
    print(f"dark border (share of the frame that is dark): {d['n']} development slices min {d['min']:.2f}, "
          f"1 % quantile {d['q01']:.2f}; {d['below']} below the caveat's {d['threshold']:.2f}")
    print(f"{'input':52s} {'score':>6s} {'layers':>7s}  {'flag':4s}  {'border':>6s}  prediction")
    for r in rows:
        other = (" [modality caveat]" if any("not MR" in c for c in r["caveats"]) else "") + \
            (" [colour caveat]" if any(IN_COLOUR in c for c in r["caveats"]) else "") + \
            (" [dark-border caveat]" if any(NO_DARK_BORDER in c for c in r["caveats"]) else "")
        border = "" if r["dark_border"] is None else f"{r['dark_border']:.2f}"
        layers = "" if r["layer_score"] is None else f"{r['layer_score']:.2f}"
        print(f"{r['input']:52s} {r['score']:6.3f} {layers:>7s}  {'' if r['familiar'] else 'FLAG':4s}  {border:>6s}  "
              f"{r['label']} ({r['p']:.2f}){other}")
    for group in ("pydicom", "skimage", "brats"):
        g = [r for r in rows if r["input"].startswith(group)]
        if g:
            said = sum(not r["familiar"] or any(k in c for c in r["caveats"] for k in (IN_COLOUR, NO_DARK_BORDER, "not MR"))
                       for r in g)
            print(f"{group}: {sum(not r['familiar'] for r in g)} of {len(g)} flagged; {said} flagged or with a "
                  "not-MRI caveat (modality, colour, dark border)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
