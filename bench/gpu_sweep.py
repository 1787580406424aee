"""Training configs run side by side on a borrowed GPU machine that has no copy of the image folder.

The lease is short (minutes) and the machine cannot reach ../shared, so the work is split in two:

``pack`` (here)
    writes the exact uint8 arrays ``tumorlens.data.dataset.load_arrays`` builds from the manifest
    folder (images as lossless WebP, masks bit-packed) with the manifest's own bytes into one folder
    small enough to travel beside the repository; the round trip is checked bit for bit.
``run`` (there)
    rebuilds the manifest folder with empty stand-ins for the image files (so the manifest, its
    grouped split and its hash are the real ones), writes the arrays where ``load_arrays`` looks for
    them, then runs ``tumorlens train --config C`` for every config at once, each with
    ``train.budget_minutes`` so its one-cycle schedule fits the lease, and stops whatever overruns a
    hard deadline. Model cards and logs come back in one archive, the best checkpoints (by training's
    own selection score on the grouped validation part) in parts small enough to fetch.
``join`` (here)
    puts a fetched checkpoint's parts back together as a model folder.

Training itself is the project's own command; nothing here changes what a config trains.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

PART_BYTES = 15 * 1024 * 1024


def pack(data: Path, size: int, out: Path) -> None:
    from PIL import Image

    from tumorlens.data.dataset import load_arrays
    from tumorlens.data.manifest import load_manifest

    manifest = load_manifest(data)
    images, masks, labels = load_arrays(manifest, size)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "manifest.csv", out / "manifest.csv")
    blobs = []
    for a in tqdm(images, desc="lossless WebP"):
        b = io.BytesIO()
        Image.fromarray(a).save(b, "WEBP", lossless=True, quality=100, method=6)
        blobs.append(np.frombuffer(b.getvalue(), np.uint8))
    np.savez_compressed(out / f"arrays-{size}.npz", webp=np.concatenate(blobs), ends=np.cumsum([len(b) for b in blobs]),
             bits=np.packbits(masks > 0), shape=np.array(masks.shape), labels=labels)
    back, mback, lback = unpack(out, size)
    assert np.array_equal(back, images) and np.array_equal(mback, masks) and np.array_equal(lback, labels)
    print(json.dumps({"images": len(images), "size": size, "bytes": sum(p.stat().st_size for p in out.iterdir())}))


def unpack(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from PIL import Image

    z = np.load(folder / f"arrays-{size}.npz")
    blob, ends = z["webp"], z["ends"]
    starts = np.concatenate([[0], ends[:-1]])
    images = np.stack([np.asarray(Image.open(io.BytesIO(blob[s:e].tobytes())).convert("L")) for s, e in zip(starts, ends, strict=True)])
    shape = tuple(int(v) for v in z["shape"])
    masks = np.unpackbits(z["bits"])[: int(np.prod(shape))].reshape(shape).astype(np.uint8)
    return images, masks, z["labels"]


def stage(packed: Path, data: Path, size: int) -> None:
    """The manifest folder with empty stand-in files, and the arrays where ``load_arrays`` reads them."""
    from tumorlens.data.dataset import cache_dir, cache_key
    from tumorlens.data.manifest import load_manifest

    if (data / "manifest.csv").exists():  # a real image folder, or an earlier run's stand-ins: never touched
        raise SystemExit(f"{data} already holds a manifest: stage the stand-ins somewhere else")
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(packed / "manifest.csv", data / "manifest.csv")
    import csv

    with open(data / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            for col in ("image", "mask"):
                if row.get(col):
                    p = data / row[col]
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.touch()
    manifest = load_manifest(data)
    images, masks, labels = unpack(packed, size)
    target = cache_dir() / f"arrays-{cache_key(manifest, size)}.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, images=images, masks=masks, labels=labels)


def workers_work(packed: Path, size: int) -> bool:
    """Loader worker processes need shared memory, which a small /dev/shm in a container can lack: try a
    few batches before four runs depend on it."""
    import torch

    from tumorlens.data.dataset import ArrayDataset, train_transforms
    from tumorlens.training.train import make_loader

    images, masks, labels = unpack(packed, size)
    ds = ArrayDataset(images[:256], masks[:256], labels[:256], train_transforms())
    try:
        for _ in make_loader(ds, 32, packed / "manifest.csv", num_workers=2):
            pass
        return True
    except (RuntimeError, OSError, torch.multiprocessing.ProcessRaisedException) as e:
        print(f"loader workers fail here ({type(e).__name__}: {e}); training without them", flush=True)
        return False


def run(configs: list[Path], packed: Path, size: int, deadline_min: float, out: Path, keep: int) -> None:
    from tumorlens.config import load_yaml
    from tumorlens.paths import project_root
    from tumorlens.training.train import DEFAULTS, merge, selection_score

    root = project_root()
    cfgs = {c: load_yaml(c) for c in configs}
    # one staged folder at one size serves every run: a config that reads another folder or size would
    # find only the empty stand-ins (or nothing) there
    wanted = {((root / merge(DEFAULTS, cfg)["data"]["root"]).resolve(), int(merge(DEFAULTS, cfg)["data"]["image_size"]))
              for cfg in cfgs.values()}
    if len(wanted) != 1 or next(iter(wanted))[1] != size:
        raise SystemExit(f"every config must read one data.root at data.image_size {size} (the packed arrays); "
                         f"these read {sorted((str(d), n) for d, n in wanted)}")
    data = next(iter(wanted))[0]
    t0 = time.time()
    stage(packed, data, size)
    print(f"staged in {time.time() - t0:.0f} s", flush=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not workers_work(packed, size):
        import yaml

        for i, c in enumerate(configs):
            cfgs[c]["train"]["num_workers"] = 0
            configs[i] = logs / c.name
            cfgs[configs[i]] = cfgs.pop(c)
            configs[i].write_text(yaml.safe_dump(cfgs[configs[i]], sort_keys=False))
    procs = {}
    for c in configs:
        log = open(logs / f"{c.stem}.log", "w")
        # what ``tumorlens train --config C`` runs, without building the whole CLI (whose other
        # subcommands import packages a bare GPU image lacks)
        cmd = [sys.executable, "-c", "import sys; from tumorlens.config import load_yaml; "
               "from tumorlens.training.train import train; train(load_yaml(sys.argv[1]))", str(c)]
        procs[c] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}), log)
    end = t0 + deadline_min * 60
    while any(p.poll() is None for p, _ in procs.values()) and time.time() < end:
        time.sleep(5)
    for c, (p, log) in procs.items():
        if p.poll() is None:
            p.kill()
            print(f"{c.stem}: stopped at the deadline", flush=True)
        log.close()
    rows = []
    for c in configs:
        d = root / cfgs[c]["output"]["dir"]
        card_path = d / "model_card.json"
        if not card_path.is_file() or card_path.stat().st_mtime < t0:  # none, or an earlier run's
            rows.append({"config": c.stem, "finished": False})
            continue
        card = json.loads(card_path.read_text())
        v = card["metrics"]["validation"]
        shutil.copyfile(card_path, logs / f"{c.stem}.card.json")
        rows.append({"config": c.stem, "finished": True, "score": selection_score(v), "accuracy": v["accuracy"],
                     "tumour_only_accuracy": v["tumour_only_accuracy"], "seg_dice": v["seg_dice"],
                     "best_epoch": card["metrics"]["best_epoch"], "epochs": len(card["history"]),
                     "seconds_per_epoch": card["training"]["seconds_per_epoch"], "dir": str(d)})
    done = sorted((r for r in rows if r["finished"]), key=lambda r: -r["score"])  # training's own selection rule
    for r in done[:keep]:
        blob = (Path(r["dir"]) / "checkpoint.pt").read_bytes()
        for k in range(0, len(blob), PART_BYTES):
            (out / f"{r['config']}.pt.part{k // PART_BYTES}").write_bytes(blob[k:k + PART_BYTES])
    (logs / "summary.json").write_text(json.dumps(rows, indent=2))
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs)
    print(json.dumps([{k: v for k, v in r.items() if k != "dir"} for r in rows], indent=1))


def join(parts_prefix: Path, card: Path, out: Path) -> None:
    parts = sorted(parts_prefix.parent.glob(parts_prefix.name + ".part*"), key=lambda p: int(p.suffix[5:]))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "checkpoint.pt", "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    shutil.copyfile(card, out / "model_card.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", type=Path, default=Path("../shared/data/brain-mri-2d"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("configs", nargs="+", type=Path)
    r.add_argument("--packed", type=Path, required=True)
    r.add_argument("--size", type=int, default=128)
    r.add_argument("--deadline-min", type=float, required=True, help="hard stop for every run, from the start")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-sweep")))
    r.add_argument("--keep", type=int, default=3, help="checkpoints to return (best selection scores)")
    j = sub.add_parser("join")
    j.add_argument("parts", type=Path, help="fetched <config>.pt (without .partN)")
    j.add_argument("--card", type=Path, required=True)
    j.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.data, a.size, a.out)
    elif a.cmd == "run":
        run(a.configs, a.packed, a.size, a.deadline_min, a.out, a.keep)
    else:
        join(a.parts, a.card, a.out)


if __name__ == "__main__":
    main()
