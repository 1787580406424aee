"""``tumorlens`` training task: fine-tunes the current model version on the datastore's labelled
images and publishes the result as a new version (see ``tumorlens.activelearning.versions``).

MONAI Label runs it in a subprocess (``AsyncTask``); the server keeps answering inference with the
version that was current when training started until the new folder is complete and the pointer
is swapped. Class labels come from the label's info (``class_name``, set by the client when it saves
the label), masks from the label files of the ``final`` tag.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.datastore import final_label_class
from lib.errors import bad_request
from lib.state import AppState
from tumorlens.activelearning.finetune import TRAINABLE, UNKNOWN_CLASS, finetune, item_arrays
from tumorlens.activelearning.heads import cache_keys_added, carried_heads, same_encoder, write_heads
from tumorlens.alignment.layer_statistics import carry_layer_statistics
from tumorlens.config import config_hash
from tumorlens.errors import InvalidInputError, TrainingDivergedError
from tumorlens.labels import NO_TUMOUR, class_index
from tumorlens.models.refiner import REFINER_FILE, carry_refiner
from tumorlens.models.window import WINDOW_FILE, carry_window_classifier

logger = logging.getLogger(__name__)


def labelled_items(datastore: Datastore) -> tuple[list[dict], list[str]]:
    """(items with image, label file and class, notes). A final label that names no class (the mask 3D
    Slicer's MONAI Label module saves from its "tumor" segment) is an item too, with class None: its
    outline trains the seg head, not the classifier (it had been skipped, and the annotator never told)."""
    items, notes = [], []
    for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
        cls = final_label_class(datastore, image_id)
        if not cls:
            notes.append(f"{image_id}: no class_name in the label info; its mask trains the segmentation head only "
                         "(it stays an active-learning candidate for its class)")
        items.append({"id": image_id, "image": datastore.get_image_uri(image_id),
                      "label": datastore.get_label_uri(image_id, DefaultLabelTag.FINAL), "class_name": cls or None})
    return items, notes


WINDOW_DROPPED = ("the lesion-window classifier was not carried over: the encoder was fine-tuned, so this version's "
                  "network reads other features than the one it was validated with; train one for it with "
                  "`tumorlens train-window --model FOLDER` (with the encoder frozen, the default, it goes along)")
HEADS_DROPPED = ("the text-aligned head and the familiarity check were not carried over (the encoder was fine-tuned, "
                 "or the version trained from has none): the plain classifier decides in this version and in every "
                 "version trained from it; train from a version that has them, or refit with `tumorlens align`")


def run_gone(stats: dict, grace_s: float = 60.0) -> bool:
    """True when the run these stats describe has no live process: its recorded pid is dead (killed
    by ``DELETE /train/``), or it was requested over ``grace_s`` ago and never started."""
    import psutil

    pid = stats.get("pid")
    if pid:
        try:
            return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
        except (psutil.Error, ValueError):
            return True
    try:
        asked = datetime.fromisoformat(stats.get("requested_at") or "")
    except ValueError:
        return False
    return (datetime.now(UTC) - asked).total_seconds() > grace_s


class FinetuneTrainer(TrainTask):
    def __init__(self, state: AppState):
        super().__init__("Fine-tune the current dual-head model (classifier + segmentation head) on the "
                         "datastore's final labels; publishes a new model version")
        self.state = state

    def config(self) -> dict:
        return {"max_epochs": 1, "lr": 1e-4, "batch_size": 8, "seg_weight": 1.0, "max_items": 500,
                "trainable": "heads"}

    # the largest values a request may set (a 1e30 learning rate or 1e12 epochs is a typo, not a plan)
    LIMITS = {"max_epochs": 1000, "lr": 1.0, "batch_size": 256, "seg_weight": 100.0, "max_items": 100_000}
    CHOICES = {"trainable": TRAINABLE}

    def stats(self) -> dict:
        """The last run's stats; in the server, a run recorded as going whose process is gone (stopped
        with ``DELETE /train/``, or it failed to start) is reported as such, not as still running."""
        stats = self.state.read_stats()
        if stats.get("status") in ("STARTING", "RUNNING") and run_gone(stats):
            stats = dict(stats, status="STOPPED", note="the training process is no longer running; "
                         "nothing was published by this run")
        return stats

    def mark_starting(self, settings: dict | None = None) -> None:
        """Before a training process starts: the previous run's epoch counts are not this run's. Epoch 0 of
        the run's epochs from the start: 3D Slicer's MONAI Label module shows ``epoch / total_epochs`` and,
        with neither there, read 1 / 1 as a finished run while this one was loading."""
        epochs = (settings or {}).get("max_epochs", self.config()["max_epochs"])
        self.state.write_stats({"status": "STARTING", "requested_at": datetime.now(UTC).isoformat(timespec="seconds"),
                                "from_version": self.state.model_version(), "epoch": 0,
                                "total_epochs": int(float(epochs))})

    def check_ready(self, datastore: Datastore) -> None:
        """Before a training process starts: a 400 when there is nothing to train on."""
        items, notes = labelled_items(datastore)
        if not items:
            raise bad_request("nothing to train on: no image has a final label; save labels (with params "
                              "{\"class_name\": ...} to train the classifier too) first")

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        cfg = dict(self.config())
        cfg.update({k: v for k, v in request.items() if k in cfg})
        t0 = time.time()
        self.state.versions.sweep()
        base = self.state.model()
        base_version = self.state.model_version()
        items, notes = labelled_items(datastore)
        items = items[: int(cfg["max_items"])]
        stats = {"status": "RUNNING", "pid": os.getpid(), "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "from_version": base_version, "items": len(items), "notes": notes, "epochs": [], "epoch": 0,
                 "total_epochs": int(cfg["max_epochs"])}
        self.state.write_stats(stats)
        if not items:
            stats.update(status="ERROR", error="no labelled images in the datastore")
            self.state.write_stats(stats)
            raise InvalidInputError(None, stats["error"])
        xs, ms, ys, unoutlined = [], [], [], []
        for it in items:
            try:
                x, m, y = item_arrays(it["image"], it["label"], it["class_name"], base.image_size)
            except InvalidInputError as e:
                notes.append(f"{it['id']}: {e.problem}; skipped")
                continue
            xs.append(x)
            ms.append(m)
            ys.append(y)
            if ((y != class_index(NO_TUMOUR)) & ~m.reshape(len(m), -1).any(1)).any():
                unoutlined.append(str(it["id"]))
        if not xs:
            stats.update(status="ERROR", error="no usable labelled images", notes=notes)
            self.state.write_stats(stats)
            raise InvalidInputError(None, stats["error"])
        images, masks, labels = np.concatenate(xs), np.concatenate(ms), np.concatenate(ys)
        known = labels != UNKNOWN_CLASS
        if not known.all():
            notes.append(f"{int((~known).sum())} slice(s) outlined without a class: segmentation head only")
        # a tumour class without an outline trains the classifier only
        has_mask = (labels == class_index(NO_TUMOUR)) | masks.reshape(len(masks), -1).any(1)
        if not has_mask.all():
            # named, so an annotator can outline them
            notes.append(f"{int((~has_mask).sum())} tumour image(s) without an outline: class only, no mask loss "
                         f"({', '.join(unoutlined[:10])}{', ...' if len(unoutlined) > 10 else ''})")

        def on_epoch(rec: dict) -> None:
            stats["epochs"].append(rec)
            # the progress keys 3D Slicer's MONAI Label module reads from /train/ status
            stats.update(epoch=rec["epoch"], total_epochs=int(cfg["max_epochs"]))
            self.state.write_stats(stats)
            logger.info(f"epoch {rec['epoch']}: loss {rec['loss']:.4f} ({rec['samples']} samples, {rec['seconds']} s)")

        try:
            net, history = finetune(base, images, masks, labels, epochs=int(cfg["max_epochs"]), lr=float(cfg["lr"]),
                                    batch_size=int(cfg["batch_size"]), seg_weight=float(cfg["seg_weight"]),
                                    on_epoch=on_epoch, progress=True, trainable=str(cfg["trainable"]),
                                    has_mask=has_mask)
        except TrainingDivergedError as e:
            stats.update(status="ERROR", error=str(e), finished_at=datetime.now(UTC).isoformat(timespec="seconds"))
            self.state.write_stats(stats)
            raise
        heads = carried_heads(base, net, images[known], labels[known])
        if not heads:
            notes.append(HEADS_DROPPED)
        refiner = (base.path / REFINER_FILE).is_file()  # the lesion refiner goes along unchanged
        encoder_kept = same_encoder(base.net, net)  # the window classifier and the layer statistics go along with it
        window = encoder_kept and (base.path / WINDOW_FILE).is_file()
        if (base.path / WINDOW_FILE).is_file() and not window:
            notes.append(WINDOW_DROPPED)
        card = dict(base.card)
        if "metrics" in card:  # measured on the version trained from, not on this one
            card["parent_metrics"] = card.pop("metrics")
        card.update(name=base.name, parent_version=base_version,
                    finetune={"items": len(xs), "samples": int(len(labels)), "config": cfg, "history": history,
                              "class_counts": np.bincount(labels[known], minlength=len(base.labels)).tolist(),
                              "unknown_class_samples": int((~known).sum()),
                              "config_hash": config_hash(cfg), "heads_carried": sorted(heads),
                              "refiner_carried": refiner, "window_classifier_carried": window,
                              "tip_adapter_keys_added": cache_keys_added(heads),
                              **({} if heads else {"heads_note": HEADS_DROPPED})},
                    trained_at=datetime.now(UTC).isoformat(timespec="seconds"))

        def extra(f, version) -> None:
            write_heads(heads, f, version)
            carry_refiner(base.path, f)
            if window:
                carry_window_classifier(base.path, f)
            if encoder_kept:
                carry_layer_statistics(base, f)

        folder = self.state.versions.publish(net, base.config, card, extra=extra)
        stats.update(status="DONE", version=folder.name, samples=int(len(labels)), notes=notes,
                     duration_s=round(time.time() - t0, 2), finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
                     best_loss=float(min(h["loss"] for h in history)), heads_carried=sorted(heads),
                     refiner_carried=refiner, window_classifier_carried=window)
        self.state.write_stats(stats)
        return stats
