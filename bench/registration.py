"""Registration to MNI152 (on one thread, as the product runs it since session 37: repeatable; ``--threads 1,2``
measures one and two threads side by side): seconds per volume (affine and deformable stages), quality
figures, and the lesion-centroid error on the synthetic warped ICBM152 2009 case; optionally the
plane accuracy of 2D template-slice placement on grouped-validation dev JPEGs, with and without the
slice-view classifier (trained on the training part's ``view`` column; here that column only scores).

    .venv/bin/python bench/registration.py [--json OUT] [--threads 1,2] [--slices N] [--sella] [--brats]
                                           [--slabs] [--skip-synthetic]

``--slabs`` also places scans of part of the head (the synthetic cases cut along the head's axis).
``--sella`` scores the *position* of 2D placement, where the truth is known without any label: a pituitary
tumour lies at the sella turcica, so a slice through one lies within ``SELLA_WINDOW`` of the sella along its
plane's normal (grouped-validation pituitary slices).

Prints a table and writes JSON. Wall seconds depend on what else runs on the machine, so the CPU
seconds of this process are reported beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def bench_synthetic(structures: list[str]) -> list[dict]:
    from tumorlens.atlas.regions import lesion_to_mni, summarise_points
    from tumorlens.atlas.registration import register_to_mni
    from tumorlens.atlas.synthetic import make_case

    rows = []
    for s in structures:
        case = make_case(s)
        # reference: the same brain and lesion left in MNI space (isolates the template-anatomy gap)
        ref_case = make_case(s, rotation_deg=(0, 0, 0), scale=(1, 1, 1), translation_mm=(0, 0, 0), warp_mm=0, bias=0)
        for deformable in (False, True):
            for tag, c in (("moved", case), ("unmoved", ref_case)):
                if tag == "unmoved" and deformable:
                    continue
                reg, wall, cpu = _timed(lambda c=c, d=deformable: register_to_mni(c.volume, d, exclude_mask=c.mask))
                pts, w = lesion_to_mni(c.mask[0].numpy(), c.volume.affine.numpy(), reg.transform)
                regions, lesion = summarise_points(pts, w)
                err = float(np.linalg.norm(np.array(lesion["centroid_mni_mm"]) - c.centroid_mni_mm))
                rows.append({
                    "case": f"{s} ({tag})", "stage": "affine+bspline" if deformable else "affine",
                    "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                    "stage_s": {k: round(v, 1) for k, v in reg.seconds.items()},
                    "dice": round(reg.quality["dice"], 3), "nmi": round(reg.quality["nmi"], 3),
                    "top_region": regions[0]["label"], "top_fraction": regions[0]["fraction"],
                    "laterality": lesion["laterality"], "centroid_err_mm": round(err, 2),
                })
                print(rows[-1], flush=True)
    return rows


def bench_brats(data: Path) -> list[dict]:
    from tumorlens.atlas.regions import map_regions
    from tumorlens.data import read_image, read_mask

    rows = []
    for pat in sorted(p for p in data.glob("pat*") if p.is_dir()):
        img = read_image(pat / "T1c_subtrMeanDivStd.nii.gz")
        mask = read_mask(pat / "OTMultiClass.nii.gz", like=img)
        for deformable in (False, True):
            out, wall, cpu = _timed(lambda img=img, mask=mask, d=deformable: map_regions(img, mask, deformable=d))
            pl = out["placement"]
            rows.append({
                "case": f"brats {pat.name} T1c", "stage": "affine+bspline" if deformable else "affine",
                "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "dice": pl["details"]["quality"]["dice"],
                "nmi": pl["details"]["quality"]["nmi"], "top_region": out["regions"][0]["label"] if out["regions"] else None,
                "top_fraction": out["regions"][0]["fraction"] if out["regions"] else None,
                "laterality": out["lesion"]["laterality"], "centroid_mni_mm": out["lesion"]["centroid_mni_mm"],
            })
            print(rows[-1], flush=True)
    return rows


def bench_slabs(structures: list[str]) -> list[dict]:
    """Scans of part of the head: the synthetic cases (2 mm) cut axially, sagittally or coronally around the
    lesion, or to the part on either side of it, and blocks cut along two axes (the lesion's side of an axial
    cut and of a sagittal or coronal one); affine fit on a 3 mm grid as the tests use."""
    from monai.data import MetaTensor

    from tumorlens.atlas.regions import map_regions
    from tumorlens.atlas.synthetic import make_case

    rows = []
    for s in structures:
        case = make_case(s, spacing_mm=2.0, radius_mm=6.0)
        m = case.mask[0].numpy()
        cuts = []
        centre = {a: int(np.nonzero(m.any(tuple(b for b in range(3) if b != a)))[0].mean()) for a in range(3)}
        for axis, plane in ((2, "axial"), (0, "sagittal"), (1, "coronal")):
            n, c = m.shape[axis], centre[axis]
            cuts += [(f"{plane} {2 * 2 * h} mm around the lesion", ((axis, c - h, c + h),)) for h in (30, 18)]
            cuts += [(f"{plane}, lesion side from 24 mm before it", ((axis, c - 12, n),)),
                     (f"{plane}, up to 28 mm past the lesion", ((axis, 0, c + 14),))]
        # blocks: the lesion's side of the head along two axes, cut 56 mm before the lesion's middle axially
        # and 30 mm past it sagittally or coronally
        for axis, plane in ((0, "sagittal"), (1, "coronal")):
            n, c = m.shape[axis], centre[axis]
            part = (axis, 0, c + 15) if c < n / 2 else (axis, c - 15, n)
            cuts += [(f"block: axial from 56 mm before the lesion x {plane} lesion side", ((2, centre[2] - 28, m.shape[2]), part)),
                     (f"block: axial up to 56 mm past the lesion x {plane} lesion side", ((2, 0, centre[2] + 28), part))]
        for name, parts in cuts:
            vol, mask = case.volume, case.mask
            for axis, lo, hi in parts:
                lo, hi = max(lo, 0), min(hi, vol.shape[axis + 1])
                affine = vol.affine.clone()
                affine[:3, 3] += affine[:3, axis] * lo
                cut = (slice(None),) * (axis + 1) + (slice(lo, hi),)
                vol = MetaTensor(vol[cut].clone(), affine=affine, meta=dict(case.volume.meta))
                mask = MetaTensor(mask[cut].clone(), affine=affine.clone())
            out, wall, cpu = _timed(lambda v=vol, m=mask: map_regions(v, m, deformable=False, working_spacing=3.0))
            q, centroid = out["placement"]["details"]["quality"], out["lesion"].get("centroid_mni_mm")
            rows.append({
                "case": f"{s} slab {name}", "stage": "affine (3 mm)", "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                "shape": list(vol.shape[1:]), "coverage": q.get("coverage"), "dice": q["dice"], "nmi": q["nmi"],
                "placed": not out["placement"]["low_confidence"],
                "top_region": out["regions"][0]["label"] if out["regions"] else None,
                "top_fraction": out["regions"][0]["fraction"] if out["regions"] else None,
                "centroid_err_mm": None if centroid is None else round(float(np.linalg.norm(
                    np.array(centroid) - case.centroid_mni_mm)), 2),
            })
            print(rows[-1], flush=True)
    return rows


def bench_slices(data: Path, n: int) -> dict:
    from tqdm import tqdm

    from tumorlens.atlas.placement import place_slice
    from tumorlens.data import read_image
    from tumorlens.data.manifest import load_manifest
    from tumorlens.data.splits import training_split

    # grouped validation part only: the slice-view classifier was trained on the training part
    _, val_idx = training_split(load_manifest(data), 0.2, 0)
    with open(data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [rows[i] for i in val_idx if rows[i].get("view")]
    per_view = max(1, n // 3)
    sample = []
    for v in ("axial", "coronal", "sagittal"):
        rv = [r for r in rows if r["view"] == v]
        sample += rv[:: max(1, len(rv) // per_view)][:per_view]
    out = {}
    for mode, use_view in (("with_view_classifier", True), ("template_only", False)):
        res = []
        for r in tqdm(sample, desc=f"placing slices ({mode})"):
            pl = place_slice(read_image(data / r["image"]), use_view=use_view)
            res.append({"view": r["view"], "plane": pl.plane, "confidence": pl.confidence, "seconds": pl.seconds})
        out[mode] = _slice_summary(res)
    return out


# where a slice through a pituitary tumour lies along each plane's normal (MNI mm): the sella turcica is near
# x 0, y 0, z -30; the windows are generous (20 mm either way, a macroadenoma reaches above the sella)
SELLA_WINDOW = {"axial": (-50.0, -10.0), "coronal": (-20.0, 20.0), "sagittal": (-20.0, 20.0)}


def bench_sella(data: Path, confident: float = 0.5) -> dict:
    """Position truth for 2D placement: every grouped-validation pituitary slice is cut through the sella. Measured
    as shipped and without the similarity gate on the position (``POSITION_SIM_MIN``), side by side."""
    from tqdm import tqdm

    import tumorlens.atlas.placement as placement
    from tumorlens.data import read_image
    from tumorlens.data.manifest import load_manifest
    from tumorlens.data.splits import training_split

    _, val_idx = training_split(load_manifest(data), 0.2, 0)
    with open(data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [rows[i] for i in val_idx if rows[i]["label"] == "pituitary"]
    shipped = placement.POSITION_SIM_MIN
    out: dict = {"n": len(rows), "window_mm": SELLA_WINDOW}
    for mode, gate in (("shipped", shipped), ("without_position_gate", 0.0)):
        placement.POSITION_SIM_MIN = gate
        res = []
        for r in tqdm(rows, desc=f"placing pituitary slices ({mode})"):
            pl = placement.place_slice(read_image(data / r["image"]))
            lo, hi = SELLA_WINDOW[pl.plane]
            res.append({"view": r["view"], "plane": pl.plane, "position_mm": pl.position_mm,
                        "similarity": round(pl.similarity, 3), "at_sella": bool(lo <= pl.position_mm <= hi),
                        "confidence": round(pl.confidence, 3)})
        conf = [x for x in res if x["confidence"] >= confident]
        out[mode] = {
            "position_sim_min": gate, "plane_accuracy": float(np.mean([x["plane"] == x["view"] for x in res])),
            "at_sella": float(np.mean([x["at_sella"] for x in res])),
            "confident": len(conf), "confident_at_sella": sum(x["at_sella"] for x in conf),
            "max_confidence": max(x["confidence"] for x in res),
            "max_similarity": max(x["similarity"] for x in res),
            "positions": {v: sorted({x["position_mm"] for x in res if x["plane"] == v}) for v in SELLA_WINDOW},
            "slices": res,
        }
    placement.POSITION_SIM_MIN = shipped
    return out


def _slice_summary(res: list[dict]) -> dict:
    acc = {v: float(np.mean([x["plane"] == v for x in res if x["view"] == v])) for v in ("axial", "coronal", "sagittal")}
    conf = [x for x in res if x["confidence"] >= 0.5]
    return {
        "n": len(res), "plane_accuracy": float(np.mean([x["plane"] == x["view"] for x in res])),
        "plane_accuracy_by_view": acc,
        "confident_share": len(conf) / max(1, len(res)),
        "accuracy_when_confident": float(np.mean([x["plane"] == x["view"] for x in conf])) if conf else None,
        "seconds_mean": float(np.mean([x["seconds"] for x in res])),
        "seconds_max": float(np.max([x["seconds"] for x in res])),
    }


def main() -> int:
    from tumorlens.paths import shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/registration.json")
    ap.add_argument("--structures", default="Left_Insular_Cortex,Right_Putamen")
    ap.add_argument("--slices", type=int, default=0, help="also score 2D placement on N dev JPEGs")
    ap.add_argument("--brats", action="store_true", help="also time the two BraTS volumes")
    ap.add_argument("--slabs", action="store_true", help="also place slabs (partial coverage) of the synthetic cases")
    ap.add_argument("--sella", action="store_true", help="also score 2D placement positions on pituitary slices")
    ap.add_argument("--skip-synthetic", action="store_true", help="skip the synthetic volume registrations")
    ap.add_argument("--threads", default="1", help="thread counts of the synthetic registrations, side by side "
                                                     "(the product uses 1: repeatable)")
    args = ap.parse_args()
    import tumorlens.atlas.registration as registration

    shipped = registration.THREADS
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    synthetic = []
    for n in threads if not args.skip_synthetic else []:
        registration.THREADS = n
        synthetic += [r | {"threads": n} for r in bench_synthetic(args.structures.split(","))]
    registration.THREADS = shipped
    result: dict = {"threads": shipped, "threads_measured": threads, "synthetic": synthetic}
    if args.brats:
        result["brats"] = bench_brats(shared_data_dir() / "brats-3d")
    if args.slabs:
        result["slabs"] = bench_slabs(["Right_Putamen", "Left_Precentral_Gyrus"])
    if args.slices:
        result["slices"] = bench_slices(shared_data_dir() / "brain-mri-2d", args.slices)
    if args.sella:
        result["sella"] = bench_sella(shared_data_dir() / "brain-mri-2d")
    print(f"\n{'case':<36} {'stage':<15} {'thr':>3} {'wall s':>7} {'cpu s':>6} {'dice':>6} {'nmi':>6} {'err mm':>7}"
          "  top region")
    for r in result["synthetic"] + result.get("brats", []) + result.get("slabs", []):
        err = r.get("centroid_err_mm", "")
        print(f"{r['case']:<36} {r['stage']:<15} {r.get('threads', shipped):>3} {r['wall_s']:>7} {r['cpu_s']:>6} "
              f"{r['dice']:>6} {r['nmi']:>6} {err!s:>7}  {r['top_region']} ({r['top_fraction']})")
    if "slices" in result:
        for mode, s in result["slices"].items():
            print(f"\n2D placement, {mode}, {s['n']} grouped-validation dev JPEGs: plane accuracy "
                  f"{s['plane_accuracy']:.2f} {s['plane_accuracy_by_view']}, confident {s['confident_share']:.2f} "
                  f"(accuracy then {s['accuracy_when_confident']}), {s['seconds_mean']:.1f} s/slice")
    if "sella" in result:
        s = result["sella"]
        for mode in ("shipped", "without_position_gate"):
            m = s[mode]
            print(f"\n2D placement position ({mode}), {s['n']} grouped-validation pituitary slices (truth: the sella, "
                  f"within {s['window_mm']}): plane right {m['plane_accuracy']:.2f}, placed at the sella "
                  f"{m['at_sella']:.2f}; confidence >= 0.5: {m['confident']} slices, {m['confident_at_sella']} of them "
                  f"at the sella; highest confidence {m['max_confidence']}, highest similarity {m['max_similarity']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
