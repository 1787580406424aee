"""Server benchmark (issue 5): latency (p50/p95) and throughput of ``/infer/classification`` and a
saliency task through the real MONAI Label server and the real ``monailabel`` client, against the
same call in-process (read the file, run the same tumorlens call), with 1 and 4 concurrent clients.
Overhead = server p50 / in-process p50 - 1 (target <= 15 % for 2D classification).

    nice -n 10 .venv/bin/python bench/server.py --n 40 --n-saliency 6 --json runs/bench-server.json

Server and in-process calls alternate (one of each, again and again) so that a shared, busy CPU
slows both alike. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def run_clients(fn, n_clients: int, n_per_client: int) -> tuple[list[float], float]:
    """Latencies of ``n_clients`` threads each calling ``fn(k)`` ``n_per_client`` times, and the wall time."""
    lat: list[float] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for _ in range(n_per_client):
            t = time.perf_counter()
            fn(k)
            d = time.perf_counter() - t
            with lock:
                lat.append(d)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40, help="classification requests per client (default 40)")
    p.add_argument("--n-saliency", type=int, default=6, help="saliency requests per client (default 6)")
    p.add_argument("--saliency", default="saliency_gradcampp", help="saliency task (default saliency_gradcampp)")
    p.add_argument("--with-regions", action="store_true", help="include atlas placement in the saliency calls")
    p.add_argument("--clients", default="1,4", help="concurrent clients to measure (default 1,4)")
    p.add_argument("--image", default="mri2d_1941", help="sample study id (default mri2d_1941)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from monailabel.client import MONAILabelClient

    from tumorlens.data import read_image
    from tumorlens.inference import Predictor
    from tumorlens.models import load_model
    from tumorlens.paths import sample_studies_dir
    from tumorlens.serving.process import ServerProcess

    work = Path(tempfile.mkdtemp(prefix="tl-bench-server-"))
    studies = work / "studies"
    shutil.copytree(sample_studies_dir(), studies)
    image_file = next(studies.glob(args.image + ".*"))
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(work / "sessions")}
    model = load_model()
    method = args.saliency.replace("saliency_", "")
    sal_params = {} if args.with_regions else {"with_regions": False}

    def local_classification(_k: int) -> None:
        Predictor(model).predict(read_image(image_file))

    def local_saliency(_k: int) -> None:  # thread-safe: the saliency hooks record per thread, as in the app
        from tumorlens.saliency import explain

        explain(read_image(image_file), method=method, model=model, with_regions=args.with_regions)

    rows = []
    with ServerProcess(studies, env=env, log_path=work / "server.log") as srv:
        clients = {}

        def client(k: int) -> MONAILabelClient:
            if k not in clients:
                clients[k] = MONAILabelClient(srv.url, tmpdir=str(work / f"c{k}"))
                (work / f"c{k}").mkdir(exist_ok=True)
            return clients[k]

        def remote(model_name: str, params: dict):
            def call(k: int) -> None:
                out, _ = client(k).infer(model_name, args.image, dict(params))
                if out:
                    os.unlink(out)
            return call

        tasks = [("classification", remote("classification", {}), local_classification, args.n),
                 (args.saliency, remote(args.saliency, sal_params), local_saliency, args.n_saliency)]
        for name, rcall, lcall, n in tasks:
            rcall(0)
            lcall(0)  # warm-up: caches, lazy imports
            for nc in [int(c) for c in args.clients.split(",")]:
                r_lat, l_lat, r_wall, l_wall = [], [], 0.0, 0.0
                for _ in range(n):  # alternate one request of each kind per round
                    lr, wr = run_clients(rcall, nc, 1)
                    ll, wl = run_clients(lcall, nc, 1)
                    r_lat += lr
                    l_lat += ll
                    r_wall += wr
                    l_wall += wl
                row = {"task": name, "clients": nc, "requests": len(r_lat),
                       "server_p50_ms": pct(r_lat, 50), "server_p95_ms": pct(r_lat, 95),
                       "server_rps": len(r_lat) / r_wall,
                       "inproc_p50_ms": pct(l_lat, 50), "inproc_p95_ms": pct(l_lat, 95),
                       "inproc_rps": len(l_lat) / l_wall}
                row["overhead_p50"] = row["server_p50_ms"] / row["inproc_p50_ms"] - 1
                rows.append(row)
                print(f"{name:22s} clients={nc} n={row['requests']:3d}  server p50 {row['server_p50_ms']:8.1f} ms "
                      f"p95 {row['server_p95_ms']:8.1f} ms {row['server_rps']:6.2f}/s | in-process p50 "
                      f"{row['inproc_p50_ms']:8.1f} ms p95 {row['inproc_p95_ms']:8.1f} ms {row['inproc_rps']:6.2f}/s"
                      f" | overhead p50 {row['overhead_p50'] * 100:+6.1f} %", flush=True)
    import torch

    result = {"rows": rows, "image": args.image, "image_dims": list(read_image(image_file).shape[1:]),
              "model": {"name": model.name, "version": model.version}, "saliency_with_regions": args.with_regions,
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "target": "classification overhead_p50 <= 0.15 (1 and 4 clients)"}
    result["classification_overhead_ok"] = all(r["overhead_p50"] <= 0.15 for r in rows if r["task"] == "classification")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
