"""Saliency benchmark (issue 4 item 9): costs measured in one run, as ratios.

1. Grad-CAM + Grad-CAM++ from one shared pass vs ONE plain forward+backward (``loss.backward()``
   into every parameter) vs ``monai.visualize`` GradCAM then GradCAMpp (one after the other).
   Target: shared <= 1.3x one forward+backward.
2. ScoreCAM batched (all non-zero channels) and batched + ranked (95 % of the activation mass)
   vs a plain ScoreCAM (one full forward per channel), with the maps' correlation.
   Target: >= 3x faster with correlation >= 0.95.

    nice -n 10 .venv/bin/python bench/saliency.py --n 4 --n-scorecam 1 --json runs/bench-saliency.json

One thread by default (the machine is shared: ratios, not absolute times, are the point).
Not part of CI (the plain ScoreCAM alone costs ~1000 forwards per image).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tumorlens.paths import shared_data_dir  # noqa: E402


def _timeit(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="images for the Grad-CAM timings")
    ap.add_argument("--n-scorecam", type=int, default=1, help="images for the ScoreCAM comparison")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default="runs/bench-saliency.json")
    ap.add_argument("--clusters", default="64,128", help="Cluster-ScoreCAM mask counts to measure (comma-separated)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from monai.visualize import GradCAM, GradCAMpp

    from tumorlens.data import read_image
    from tumorlens.inference import prepare_slice
    from tumorlens.models import load_model
    from tumorlens.models.dualhead import ClassifierView
    from tumorlens.saliency.cam import grad_cams, score_cam, score_cam_plain, select_channels

    lm = load_model(args.model)
    net = lm.net.eval()
    root = shared_data_dir() / "brain-mri-2d"
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["mask"]]
    rows = rows[:: max(1, len(rows) // max(args.n, args.n_scorecam))][: max(args.n, args.n_scorecam)]
    xs = [prepare_slice(read_image(root / r["image"]).numpy()[0], lm.image_size) for r in rows]

    # 1. Grad-CAM + Grad-CAM++
    # .eval(): monai's hooks restore the wrapper's *own* training flag afterwards, and a fresh
    # nn.Module is in training mode, so without it the net would be left in train mode (BN on
    # batch statistics, dropout on) for everything that follows.
    view = ClassifierView(net).eval()
    layer = f"net.{net.cam_layer}"
    gc, gcpp = GradCAM(view, target_layers=layer), GradCAMpp(view, target_layers=layer)

    def fwd_bwd(x):
        net.zero_grad(set_to_none=True)
        logits, _ = net(x)
        logits[0, int(logits.argmax())].backward()

    def monai_both(x):
        gc(x)
        gcpp(x)

    res = {"threads": args.threads, "model": {"name": lm.name, "version": lm.version}, "gradcam": [], "scorecam": []}
    for x in tqdm(xs[: args.n], desc="grad-cam timings"):
        t_fb = _timeit(lambda x=x: fwd_bwd(x), args.repeat)
        t_sh = _timeit(lambda x=x: grad_cams(net, x), args.repeat)
        t_mo = _timeit(lambda x=x: monai_both(x), args.repeat)
        res["gradcam"].append({"fwd_bwd_s": t_fb, "shared_s": t_sh, "monai_two_s": t_mo})
    net.zero_grad(set_to_none=True)
    net.eval()
    g = res["gradcam"]
    fb = statistics.median(r["fwd_bwd_s"] for r in g)
    sh = statistics.median(r["shared_s"] for r in g)
    mo = statistics.median(r["monai_two_s"] for r in g)
    res["gradcam_summary"] = {"fwd_bwd_s": fb, "shared_s": sh, "monai_two_s": mo,
                              "shared_over_fwd_bwd": sh / fb, "monai_over_shared": mo / sh,
                              "target_shared_over_fwd_bwd": 1.3}

    # 2. ScoreCAM
    for x in tqdm(xs[: args.n_scorecam], desc="scorecam"):
        t0 = time.perf_counter()
        plain = score_cam_plain(net, x)
        t_plain = time.perf_counter() - t0
        target = int(net(x)[0].argmax())
        t0 = time.perf_counter()
        full = score_cam(net, x, target=target, mass=None).maps["scorecam"][0]
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        ranked = score_cam(net, x, target=target, mass=0.95).maps["scorecam"][0]
        t_ranked = time.perf_counter() - t0
        clustered = {}
        for k in [int(c) for c in args.clusters.split(",") if c]:
            t0 = time.perf_counter()
            cm = score_cam(net, x, target=target, mass=None, clusters=k).maps["scorecam"][0]
            clustered[str(k)] = {"seconds": time.perf_counter() - t0, "corr_vs_plain": _corr(cm, plain)}
        feats = {}
        h = net.get_submodule(net.cam_layer).register_forward_hook(lambda _m, _i, o, d=feats: d.__setitem__("a", o))
        with torch.no_grad():
            net(x)
        h.remove()
        a = torch.relu(feats["a"][0])
        res["scorecam"].append({
            "channels": int(a.shape[0]), "nonzero_channels": int((a.flatten(1).sum(1) > 0).sum()),
            "ranked_channels": int(len(select_channels(a, 0.95))),
            "plain_s": t_plain, "batched_s": t_full, "batched_ranked_s": t_ranked,
            "corr_batched_vs_plain": _corr(full, plain), "corr_ranked_vs_plain": _corr(ranked, plain),
            "clustered": clustered,
        })
    s = res["scorecam"]
    res["scorecam_summary"] = {
        "speedup_batched": statistics.median(r["plain_s"] / r["batched_s"] for r in s),
        "speedup_batched_ranked": statistics.median(r["plain_s"] / r["batched_ranked_s"] for r in s),
        "corr_batched": min(r["corr_batched_vs_plain"] for r in s),
        "corr_ranked": min(r["corr_ranked_vs_plain"] for r in s),
        "target_speedup": 3.0, "target_corr": 0.95,
    }
    for k in s[0]["clustered"] if s else []:
        ss_k = {"speedup": statistics.median(r["plain_s"] / r["clustered"][k]["seconds"] for r in s),
                "corr_min": min(r["clustered"][k]["corr_vs_plain"] for r in s)}
        res["scorecam_summary"][f"clustered_{k}"] = ss_k

    ss = res["scorecam_summary"]
    print(f"model {lm.name} {lm.version}, {args.threads} thread(s), {len(g)} images (Grad-CAM), {len(s)} (ScoreCAM)")
    print(f"{'what':<44}{'seconds':>9}{'ratio':>8}")
    print(f"{'one forward+backward (full, into params)':<44}{fb:>9.3f}{1.0:>8.2f}")
    print(f"{'Grad-CAM + Grad-CAM++ shared pass':<44}{sh:>9.3f}{sh / fb:>8.2f}  (target <= 1.3)")
    print(f"{'monai GradCAM then GradCAMpp':<44}{mo:>9.3f}{mo / fb:>8.2f}")
    for r in s:
        print(f"{'ScoreCAM plain (1 channel / full forward)':<44}{r['plain_s']:>9.2f}{1.0:>8.2f}")
        print(f"{'ScoreCAM batched, all non-zero channels':<44}{r['batched_s']:>9.2f}{r['plain_s'] / r['batched_s']:>8.2f}"
              f"  corr {r['corr_batched_vs_plain']:.4f}")
        print(f"{'ScoreCAM batched + ranked (95 % mass)':<44}{r['batched_ranked_s']:>9.2f}"
              f"{r['plain_s'] / r['batched_ranked_s']:>8.2f}  corr {r['corr_ranked_vs_plain']:.4f}"
              f"  ({r['ranked_channels']}/{r['channels']} channels)")
        for k, c in r["clustered"].items():
            print(f"{f'Cluster-ScoreCAM ({k} k-means masks)':<44}{c['seconds']:>9.2f}"
                  f"{r['plain_s'] / c['seconds']:>8.2f}  corr {c['corr_vs_plain']:.4f}")
    print(f"ScoreCAM speed-up {ss['speedup_batched_ranked']:.1f}x (target >= 3), corr {ss['corr_ranked']:.3f} (>= 0.95)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
