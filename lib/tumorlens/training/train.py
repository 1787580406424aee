"""``tumorlens train --config configs/train/<name>.yaml``: joint CE + Dice training with grouped
validation, early stopping and a checkpoint with its model card."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import worker_init_fn
from monai.losses import DiceLoss
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from tumorlens.alignment.training import AlignmentTerm
from tumorlens.config import config_hash
from tumorlens.data.dataset import ArrayDataset, augmentation, load_arrays
from tumorlens.data.manifest import load_manifest
from tumorlens.data.splits import training_split
from tumorlens.errors import InvalidInputError
from tumorlens.evaluation.jsonio import dumps, json_ready
from tumorlens.evaluation.metrics import classification_metrics, dice_score
from tumorlens.labels import CLASS_NAMES
from tumorlens.models.dualhead import build_model
from tumorlens.models.registry import save_checkpoint
from tumorlens.paths import code_commit, config_data_root, project_root
from tumorlens.training.localisation import LocalisationTerm, check_kind

DEFAULTS = {
    "data": {"root": "../shared/data/brain-mri-2d", "image_size": 128, "val_fraction": 0.2, "seed": 0, "max_images": None},
    "model": {"backbone": "densenet121", "dropout": 0.3},
    "train": {
        "epochs": 30, "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
        "patience": 6, "seg_weight": 1.0, "label_smoothing": 0.05, "channels_last": True,
        "num_threads": None, "seed": 0, "max_minutes": None, "augment": True, "init_from": None,
        "pct_start": 0.15,
        # "bf16": autocast the forward pass to bfloat16 (2.2x faster for DenseNet121 at 192 px on this
        # CPU, which has avx512_bf16; weights, optimiser state and validation stay float32); "fp32": off
        "precision": "fp32",
        "localisation": {"weight": 0.0, "layer": None},  # see tumorlens.training.localisation
        # hold the class outputs of the ``init_from`` model while another term (e.g. localisation)
        # reshapes the network: weight x T^2 x KL(teacher || student) at temperature T
        "distill": {"weight": 0.0, "temperature": 2.0},
        # train only these top-level parts ("encoder", "classifier", "decoder"); the rest stays frozen,
        # batch-norm statistics included, so e.g. a decoder-only cycle cannot move any class decision
        "trainable": None,
        # Dice term of the seg loss over the whole batch ("batch") or per tumour image, averaged ("image",
        # the way seg Dice is evaluated: one missed small tumour then costs as much as a missed large one)
        "seg_dice": "batch",
        # fit the one-cycle schedule to a wall-clock budget (a GPU lease, a CI slot): after the second epoch
        # the number of epochs becomes min(epochs, what the budget holds at that epoch's pace), so the
        # learning rate still anneals to its end instead of being cut off at its peak by max_minutes
        "budget_minutes": None,
        # DataLoader worker processes for the augmentation (0: in the training process, as on 2 cores)
        "num_workers": 0,
    },
    "output": {"name": None, "dir": None, "version": None},
    # text anchoring as a training loss (issue 8): the pooled features are projected into the frozen
    # text space and pulled to their class prototype; see tumorlens.alignment.training
    "alignment": {"enabled": False, "weight": 0.5},
}


PARTS = ("encoder", "classifier", "decoder")  # what ``train.trainable`` can name
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
# keys a config may set that DEFAULTS does not list (read where the part is built)
EXTRA_KEYS = {"model": {"cam_layer", "in_channels", "spatial_dims", "num_classes"},
              "train.localisation": {"sharpness", "kind"}, "output": {"overwrite"}}
# what a trained model's folder holds besides checkpoint and card: made for that network, wrong for another
COMPANIONS = ("refiner.pt", "window_classifier.pt", "alignment.pt", "text_probe.pt", "layer_statistics.pt",
              "validation.json", "validation.confusion.png")
WHOLE = ("epochs", "batch_size", "patience", "seed")  # whole numbers; image_size is checked with them


def check_config(cfg: dict, source: str | None = None) -> None:
    """Refuse what the training would ignore or fail on late: an unknown key (a typo such as ``trian:`` trained
    30 epochs on the defaults without a word), a value of the wrong type (``epochs: ten`` was a traceback), an
    unknown backbone or optimizer (refused only after every image was loaded), a size or rate out of range."""
    import difflib

    def walk(user, defaults: dict, where: str) -> None:
        if not isinstance(user, dict):
            raise InvalidInputError(source, f"{where or 'the config'} must be a mapping of keys, got {user!r}"[:200])
        allowed = set(defaults) | EXTRA_KEYS.get(where, set())
        for k, v in user.items():
            path = f"{where}.{k}" if where else str(k)
            if k not in allowed:
                near = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"known here: {', '.join(sorted(allowed))}"
                raise InvalidInputError(source, f"unknown config key {path!r} ({hint})")
            d = defaults.get(k)
            if isinstance(d, dict):
                if v is not None:
                    walk(v, d, path)
            elif path == "train.augment":
                from tumorlens.data.dataset import AUGMENT_LEVELS

                if not isinstance(v, bool) and v not in AUGMENT_LEVELS:
                    raise InvalidInputError(source, f"{path} must be true, false or one of {', '.join(AUGMENT_LEVELS)}, "
                                                    f"not {v!r}")
            elif isinstance(d, bool):
                if not isinstance(v, bool):
                    raise InvalidInputError(source, f"{path} must be true or false, not {v!r}")
            elif isinstance(d, int | float) and v is not None and not _number(v):
                raise InvalidInputError(source, f"{path} must be a number, not {v!r}")

    walk(cfg or {}, DEFAULTS, "")
    full = merge(DEFAULTS, cfg)
    dc, tc, mc = full["data"], full["train"], full["model"]
    for key in WHOLE:
        v = tc[key]
        if not _number(v) or float(v) != int(float(v)) or int(float(v)) < (0 if key in ("patience", "seed") else 1):
            raise InvalidInputError(source, f"train.{key} must be a whole number >= "
                                            f"{0 if key in ('patience', 'seed') else 1}, not {v!r}")
    if not _number(dc["image_size"]) or float(dc["image_size"]) != int(float(dc["image_size"])) \
            or int(float(dc["image_size"])) < 32:
        raise InvalidInputError(source, f"data.image_size must be a whole number of pixels >= 32, not {dc['image_size']!r}")
    if not 0 < float(dc["val_fraction"]) < 1:
        raise InvalidInputError(source, f"data.val_fraction must lie between 0 and 1, not {dc['val_fraction']!r}")
    if float(tc["lr"]) <= 0 or float(tc["weight_decay"]) < 0:
        raise InvalidInputError(source, f"train.lr must be > 0 and train.weight_decay >= 0, not {tc['lr']!r} / "
                                        f"{tc['weight_decay']!r}")
    if str(tc["optimizer"]).lower() not in OPTIMIZERS:
        raise InvalidInputError(source, f"train.optimizer {tc['optimizer']!r} is not one of {', '.join(OPTIMIZERS)}")
    from tumorlens.models.dualhead import BACKBONES

    if mc["backbone"] not in BACKBONES:
        raise InvalidInputError(source, f"model.backbone {mc['backbone']!r} is not one of {', '.join(BACKBONES)}")


def _number(v) -> bool:
    """A number, or a string YAML left one as (``1e-3`` without a dot is a string to YAML 1.1)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    try:
        float(v)
        return isinstance(v, str)
    except (TypeError, ValueError):
        return False


def output_folder(cfg: dict) -> Path:
    """Where ``train`` writes the model of (merged) ``cfg``."""
    oc = cfg["output"]
    name = oc.get("name") or f"tumorlens-{cfg['model']['backbone']}"
    return Path(oc.get("dir") or (Path(os.environ.get("TUMORLENS_MODELS_DIR", project_root() / "models")) / name))


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _commit() -> str:
    return code_commit() or "unknown"


def make_optimizer(name: str, params, lr: float, wd: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}: adamw, adam, sgd or rmsprop")


@torch.no_grad()
def predict_arrays(net, images: np.ndarray, device, batch: int = 64, channels_last: bool = False):
    """(probs [N, C], seg_prob [N, S, S]) for uint8 arrays already at the network size."""
    net.eval()
    probs, segs = [], []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s:s + batch]).float()[:, None].div_(255).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lo, sg = net(x)
        probs.append(lo.float().softmax(1).cpu())
        segs.append(sg.float().sigmoid()[:, 0].cpu())
    return torch.cat(probs).numpy(), torch.cat(segs).numpy()


def make_loader(ds: ArrayDataset, batch_size: int, where: Path, num_workers: int = 0) -> DataLoader:
    """Shuffled training batches that always give at least one step per epoch.

    Dropping the last partial batch keeps batch statistics steady, but with fewer images than one
    batch it left no batch at all (and OneCycleLR refuses 0 steps): then the whole part is one batch.
    """
    n = len(ds)
    if n < 2:
        raise InvalidInputError(where, f"the training part of the split has {n} image(s): training needs at least 2 "
                                       "(add images, or lower data.val_fraction)")
    bs = max(2, min(int(batch_size), n))
    workers = max(0, int(num_workers))
    # each worker re-seeds its own copy of the MONAI random transforms (a forked copy would repeat the
    # same augmentation in every worker)
    return DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=n > bs,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=worker_init_fn if workers > 0 else None)


def fitted_epochs(planned: int, done: int, elapsed_s: float, epoch_s: float, budget_minutes: float | None) -> int:
    """How many epochs in all a wall-clock budget holds: those ``done`` in ``elapsed_s``, plus what the
    rest of the budget holds at the pace of the last epoch (``epoch_s``); never more than planned nor
    fewer than done. The pace is read from the second epoch: the first also pays for warm-up (kernel
    selection, loader workers starting) and would make the estimate far too short."""
    if not budget_minutes:
        return planned
    more = int(max(0.0, float(budget_minutes) * 60 - elapsed_s) // max(epoch_s, 1e-6))
    return max(done, min(planned, done + more))


def selection_score(vm: dict) -> float:
    """What picks the best epoch: validation accuracy plus half the seg Dice. A validation part without
    masks has no seg Dice (NaN); it then counts as nothing rather than making every score NaN (no epoch
    would ever be kept)."""
    acc = vm.get("accuracy")
    dice = vm.get("seg_dice")
    acc = float(acc) if acc is not None and math.isfinite(acc) else 0.0
    return acc + (0.5 * float(dice) if dice is not None and math.isfinite(dice) else 0.0)


def validate(net, images, masks, labels, device, channels_last=False) -> dict:
    probs, seg = predict_arrays(net, images, device, channels_last=channels_last)
    m = classification_metrics(labels, probs, CLASS_NAMES)
    has = masks.reshape(len(masks), -1).any(1)
    m["seg_dice"] = float(np.mean([dice_score(seg[i] >= 0.5, masks[i] > 0) for i in np.where(has)[0]])) if has.any() else float("nan")
    return m


def train(cfg: dict, progress: bool = True, source: str | None = None) -> dict:
    """Train one dual-head model from ``cfg`` (over ``DEFAULTS``; ``source``: its file, for messages)."""
    check_config(cfg, source)
    cfg = merge(DEFAULTS, cfg)
    dc, tc, oc = cfg["data"], cfg["train"], cfg["output"]
    dist_cfg = {"weight": 0.0, "temperature": 2.0, **(tc.get("distill") or {})}
    if float(dist_cfg["weight"]) > 0 and not tc.get("init_from"):
        raise InvalidInputError(None, "train.distill needs train.init_from (the teacher is the model training starts from)")
    precision = str(tc.get("precision") or "fp32").lower()
    if precision not in ("fp32", "bf16"):
        raise InvalidInputError(None, f"train.precision must be fp32 or bf16, not {precision!r}")
    trainable = tc.get("trainable")
    if trainable is not None:
        if not trainable or set(trainable) - set(PARTS):
            raise InvalidInputError(None, f"train.trainable must list some of {', '.join(PARTS)}, not {trainable!r}")
        if "encoder" not in trainable and float((tc.get("localisation") or {}).get("weight") or 0) > 0:
            raise InvalidInputError(None, "train.localisation reshapes the encoder: it needs 'encoder' in train.trainable")
    check_kind((tc.get("localisation") or {}).get("kind", "share"))
    seg_dice_mode = str(tc.get("seg_dice") or "batch")
    if seg_dice_mode not in ("batch", "image"):
        raise InvalidInputError(None, f"train.seg_dice must be batch or image, not {seg_dice_mode!r}")
    budget = tc.get("budget_minutes")
    if budget is not None and not (isinstance(budget, int | float) and not isinstance(budget, bool) and budget > 0):
        raise InvalidInputError(None, f"train.budget_minutes must be a positive number of minutes, not {budget!r}")
    workers = tc.get("num_workers") or 0
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise InvalidInputError(None, f"train.num_workers must be a whole number >= 0, not {workers!r}")
    out = output_folder(cfg)
    if (out / "checkpoint.pt").exists() and not oc.get("overwrite"):
        raise InvalidInputError(out, "holds a trained model already (training twice into one folder replaced it "
                                     "without a word): give another output.name or --out, or --overwrite to replace "
                                     f"it, and with it its {', '.join(c for c in COMPANIONS if (out / c).exists()) or 'files'}")
    if tc.get("num_threads"):
        torch.set_num_threads(int(tc["num_threads"]))
    torch.manual_seed(int(tc["seed"]))
    np.random.seed(int(tc["seed"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: pick the fastest kernels once
    root = config_data_root(dc["root"])
    manifest = load_manifest(root)
    train_idx, val_idx = training_split(manifest, float(dc["val_fraction"]), int(dc["seed"]), dc.get("max_images"))
    size = int(dc["image_size"])
    images, masks, labels = load_arrays(manifest, size, progress=progress)
    val_groups = sorted({manifest.records[i].group for i in val_idx})
    train_groups = {manifest.records[i].group for i in train_idx}
    assert not train_groups & set(val_groups), "a group straddles train and validation"

    ds = ArrayDataset(images[train_idx], masks[train_idx], labels[train_idx],
                      augmentation(tc.get("augment", True)))
    loader = make_loader(ds, int(tc["batch_size"]), manifest.root / "manifest.csv", workers)
    loc_cfg = tc.get("localisation") or {}
    if float(loc_cfg.get("weight") or 0) > 0 and loc_cfg.get("layer"):
        cfg["model"]["cam_layer"] = loc_cfg["layer"]  # the trained explanation layer is the model's CAM layer
    net = build_model(cfg).to(device)
    parts = {"encoder": net.encoder, "classifier": net.classifier, "decoder": net.decoder}
    init = None
    if tc.get("init_from"):  # continue from a trained model (same backbone), e.g. a second LR cycle
        from tumorlens.models.registry import load_model

        prev = load_model(tc["init_from"])
        net.load_state_dict(prev.net.state_dict())
        init = {"name": prev.name, "version": prev.version, "val_accuracy": prev.card.get("metrics", {})
                .get("validation", {}).get("accuracy")}
    teacher = None
    if float(dist_cfg["weight"]) > 0:
        teacher = copy.deepcopy(prev.net).to(device).eval().requires_grad_(False)
    cl = bool(tc["channels_last"])
    if cl:
        net = net.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    counts = np.bincount(labels[train_idx], minlength=len(CLASS_NAMES)).astype(float)
    weights = torch.tensor((counts.sum() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)
    weights = weights / weights.mean()
    ce = torch.nn.CrossEntropyLoss(weight=weights.to(device), label_smoothing=float(tc["label_smoothing"]))
    dice = DiceLoss(sigmoid=True, batch=True)
    dice_each = DiceLoss(sigmoid=True, reduction="none")
    bce = torch.nn.BCEWithLogitsLoss()
    align = AlignmentTerm.from_config(cfg, net)  # None unless alignment.enabled
    loc = LocalisationTerm.from_config(tc, net)  # None unless localisation.weight > 0
    frozen = [m for k, m in parts.items() if trainable is not None and k not in trainable]
    for m in frozen:
        m.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad] + (align.parameters() if align is not None else [])
    opt = make_optimizer(tc["optimizer"], params, float(tc["lr"]), float(tc["weight_decay"]))
    epochs = int(tc["epochs"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(tc["lr"]), total_steps=epochs * len(loader),
                                                pct_start=float(tc["pct_start"]))
    sw = float(tc["seg_weight"])

    def seg_dice_loss(seg: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if seg_dice_mode == "batch":
            return dice(seg, m)
        has = m.flatten(1).any(1)
        if not has.any():  # a batch of tumour-free images: BCE alone keeps their masks empty
            return seg.sum() * 0.0
        return dice_each(seg[has], m[has]).mean()

    best, best_state, best_epoch, history, stale = -math.inf, None, -1, [], 0
    planned_epochs = epochs
    t0 = time.time()
    epoch = 0
    while epoch < epochs:
        net.train()
        for m in frozen:
            m.eval()
        te = time.time()
        losses, align_losses, loc_losses, dist_losses = [], [], [], []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, m, y in bar:
            x, m, y = x.to(device), m.to(device), y.to(device)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, seg = net(x)
            logits, seg = logits.float(), seg.float()
            loss = ce(logits, y) + sw * (seg_dice_loss(seg, m) + bce(seg, m))
            if align is not None:
                al = align.loss(y)
                loss = loss + al
                align_losses.append(al.item())
            if loc is not None:
                ll = loc.loss(logits, y, m)
                loss = loss + ll
                loc_losses.append(ll.item())
            if teacher is not None:
                t = float(dist_cfg["temperature"])
                with torch.no_grad():
                    target = (teacher(x)[0].float() / t).softmax(1)
                dl = float(dist_cfg["weight"]) * t * t * F.kl_div((logits.float() / t).log_softmax(1), target,
                                                                reduction="batchmean")
                loss = loss + dl
                dist_losses.append(dl.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        vm = validate(net, images[val_idx], masks[val_idx], labels[val_idx], device, cl)
        score = selection_score(vm)
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - te, 1),
               "val_accuracy": vm["accuracy"], "val_tumour_only_accuracy": vm["tumour_only_accuracy"],
               "val_balanced_accuracy": vm["balanced_accuracy"], "val_seg_dice": vm["seg_dice"]}
        if align_losses:
            rec["alignment_loss"] = float(np.mean(align_losses))
        if loc_losses:
            rec["localisation_loss"] = float(np.mean(loc_losses))
        if dist_losses:
            rec["distill_loss"] = float(np.mean(dist_losses))
        history.append(rec)
        if progress:
            tqdm.write(dumps(rec, indent=None))
        if best_state is None or score > best:
            best, best_epoch, stale = score, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= int(tc["patience"]):
                break
        if tc.get("max_minutes") and (time.time() - t0) / 60 > float(tc["max_minutes"]):
            break
        if budget and epoch == min(1, epochs - 1):
            fitted = fitted_epochs(epochs, epoch + 1, time.time() - t0, time.time() - te, budget)
            if fitted < epochs:  # the same one-cycle curve, compressed, continued from where it stands
                epochs = fitted
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(tc["lr"]), total_steps=epochs * len(loader),
                                                            pct_start=float(tc["pct_start"]))
                for _ in range((epoch + 1) * len(loader)):
                    sched.step()
                if progress:
                    tqdm.write(f"budget of {budget} min: {epochs} of {planned_epochs} planned epochs")
        epoch += 1
    if loc is not None:
        loc.detach()
    if align is not None:
        align.detach()  # the hook; the trained encoder is what is kept (``tumorlens align`` fits the head)
    net.load_state_dict(best_state)
    final = validate(net, images[val_idx], masks[val_idx], labels[val_idx], device, cl)
    duration = time.time() - t0
    name = oc.get("name") or f"tumorlens-{cfg['model']['backbone']}"
    card = {
        "name": name,
        "version": oc.get("version") or datetime.now(UTC).strftime("%Y%m%d%H%M"),
        "labels": list(CLASS_NAMES),
        "backbone": cfg["model"]["backbone"],
        "image_size": size,
        "config": cfg,
        "config_hash": config_hash(cfg),
        "data": {
            "root": str(dc["root"]), "manifest_sha256": manifest.sha256, "n_images": len(manifest),
            "n_train": len(train_idx), "n_val": len(val_idx),
            "split": {"method": "grouped by manifest 'group'", "val_fraction": dc["val_fraction"], "seed": dc["seed"]},
            "val_groups_sha256": hashlib.sha256("\n".join(val_groups).encode()).hexdigest(),
        },
        "metrics": {"validation": {k: final[k] for k in ("accuracy", "tumour_only_accuracy", "balanced_accuracy",
                                                          "ece", "seg_dice", "per_class")}, "best_epoch": best_epoch},
        "history": history,
        "training": {"duration_s": round(duration, 1), "device": str(device), "torch": torch.__version__,
                     "threads": torch.get_num_threads(),
                     "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 1),
                     "planned_epochs": planned_epochs, "scheduled_epochs": epochs},
        "init_from": init,
        "alignment": {"joint_loss": align is not None, **(cfg.get("alignment") or {})},
        "commit": _commit(),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for c in COMPANIONS:  # made for the network this one replaces: a stale refiner and window classifier were used
        (out / c).unlink(missing_ok=True)
    net = net.to(memory_format=torch.contiguous_format).cpu()
    card = json_ready(card)  # strict JSON: an undefined metric (no tumour or no mask in validation) is null
    save_checkpoint(net, cfg, card, out)
    return {"path": str(out), "card": card, "net": net}
