"""Scoring methods: precompute, for every unlabelled image, the uncertainty (MC-dropout entropy)
or the saliency/segmentation disagreement under the current model version.

Scores are kept in the app state (``scores.json``) keyed by image id, with the model version and
the image file's modification time, so a new model version or a replaced image is scored again
and an unchanged one is not. An image no model can read (constant, no brain, unreadable) is kept
there as ``unusable`` with the reason, for as long as its file is unchanged: the strategies leave it
out instead of handing it to an annotator (every model answers it with a 400).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from tqdm import tqdm

from lib.datastore import training_gaps
from lib.state import AppState
from tumorlens.activelearning.disagreement import saliency_seg_disagreement
from tumorlens.activelearning.scope import scope_problems
from tumorlens.activelearning.uncertainty import image_uncertainty
from tumorlens.data.readers import read_image
from tumorlens.errors import InvalidInputError

logger = logging.getLogger(__name__)

KINDS: dict[str, Callable] = {
    "uncertainty": lambda model, img: image_uncertainty(model, img, "mc_dropout"),
    "saliency_disagreement": saliency_seg_disagreement,
}
VALUE = {"uncertainty": "entropy_normalised", "saliency_disagreement": "score"}
FLUSH_S = 20.0  # a scoring run writes what it has scored at least this often


def unlabelled(datastore: Datastore) -> list[str]:
    """Images without a final label that names a class (``lib.datastore.training_gaps``)."""
    return sorted(training_gaps(datastore))


def _current_and_stale(state: AppState, datastore: Datastore, kind: str, ids: list[str]
                       ) -> tuple[dict[str, dict], list[tuple[str, str | None, float | None, str | None]]]:
    """Entries still valid for ``ids`` (same model version, same image file) and the ones to (re)score."""
    version = state.model_version()
    scores = state.read_scores()
    out: dict[str, dict] = {}
    todo = []
    for image_id in ids:
        uri, mtime, problem = located(datastore, image_id)
        entry = scores.get(image_id, {}).get(kind)
        if entry and entry.get("model_version") == version and entry.get("mtime") == mtime:
            out[image_id] = entry
        else:
            todo.append((image_id, uri, mtime, problem))
    return out, todo


def needs_scoring(state: AppState, datastore: Datastore) -> bool:
    """Whether some unlabelled image lacks a current score of some kind (a stat per image; no model)."""
    ids = unlabelled(datastore)
    return any(_current_and_stale(state, datastore, kind, ids)[1] for kind in KINDS)


def score_images(state: AppState, datastore: Datastore, kind: str, ids: list[str], limit: int | None = None,
                 progress: bool = False) -> dict[str, dict]:
    """Score ``ids`` whose entry is missing or stale (at most ``limit`` new ones); returns all
    current entries for ``ids`` as ``{id: {"value", ...}}``."""
    version = state.model_version()
    model = state.model()
    out, todo = _current_and_stale(state, datastore, kind, ids)
    new: dict[str, dict] = {}
    if limit is not None:
        todo = todo[:limit]
    stored = state.read_scores() if todo else {}
    flushed = time.monotonic()
    for image_id, uri, mtime, problem in tqdm(todo, desc=f"scoring {kind}", disable=not progress):
        if new and time.monotonic() - flushed >= FLUSH_S:
            # kept as the run goes: a run stopped with the server (1,200 images take minutes) had kept nothing,
            # and the next started over
            state.update_scores(new)
            new, flushed = {}, time.monotonic()
        try:
            if uri is None:  # the datastore itself refused it (a DICOMweb series with a missing slice)
                raise InvalidInputError(image_id, problem or "no image file")
            img = read_image(uri)
            res = KINDS[kind](model, img)
            # what the image is does not change with the score's kind or the model: found once per file (a
            # volume's check is a registration)
            known = [e["out_of_scope"] for e in stored.get(image_id, {}).values()
                     if isinstance(e, dict) and e.get("mtime") == mtime and "out_of_scope" in e]
            outside = known[0] if known else scope_problems(img)
        except InvalidInputError as e:
            logger.warning(f"cannot score {image_id}: {e.problem}")
            new[image_id] = {kind: {"unusable": e.problem, "model_version": version, "mtime": mtime}}
            continue
        # out_of_scope: the strategies hand it out after the images the model was trained for ([] when none)
        entry = {"value": float(res[VALUE[kind]]), "model_version": version, "mtime": mtime, "detail": res,
                 "out_of_scope": outside}
        out[image_id] = entry
        new[image_id] = {kind: entry}
    if new:
        state.update_scores(new)
    return {k: v for k, v in out.items() if "value" in v}


def image_uri(datastore: Datastore, image_id: str) -> tuple[str | None, str | None]:
    """``(path, None)``, or ``(None, why)`` when the datastore refuses to give the image (a 4xx: a DICOMweb
    series it cannot read): one such image must not stop scoring or a next-sample request."""
    try:
        return datastore.get_image_uri(image_id), None
    except HTTPException as e:
        if 400 <= e.status_code < 500:
            return None, str(e.detail)
        raise


def located(datastore: Datastore, image_id: str) -> tuple[str | None, float | None, str | None]:
    """``(path, its modification time, None)``, or ``(None, None, why the datastore refuses it)``: scores are
    kept for an image as its file is."""
    uri, problem = image_uri(datastore, image_id)
    return uri, (os.path.getmtime(uri) if uri and os.path.exists(uri) else None), problem


def mark_unusable(state: AppState, datastore: Datastore, image_id: str, problem: str) -> None:
    """Record that ``image_id`` cannot be read as it is now (see ``unusable``)."""
    record_unusable(state, image_id, problem, located(datastore, image_id)[1])


def record_unusable(state: AppState, image_id: str, problem: str, mtime: float | None) -> None:
    """The record ``unusable`` reads: no model can read the image while its file keeps ``mtime``."""
    state.update_scores({image_id: {"read": {"unusable": problem, "model_version": state.model_version(),
                                              "mtime": mtime}}})


def unusable(state: AppState, datastore: Datastore, ids: list[str]) -> dict[str, str]:
    """Images some scoring found no model can read, as their file is now: ``{id: reason}``."""
    scores = state.read_scores()
    out = {}
    for image_id in ids:
        entries = [e for e in scores.get(image_id, {}).values() if isinstance(e, dict) and e.get("unusable")]
        if not entries:
            continue
        mtime = located(datastore, image_id)[1]
        if any(e.get("mtime") == mtime for e in entries):
            out[image_id] = entries[0]["unusable"]
    return out


class TumorlensScoring(ScoringMethod):
    def __init__(self, state: AppState, kind: str):
        super().__init__({"uncertainty": "Predictive entropy (MC-dropout, 30 passes) of every unlabelled image",
                          "saliency_disagreement": "1 - Dice(Grad-CAM mask, seg-head mask), weighted by P(tumour), "
                                                   "of every unlabelled image"}[kind])
        self.state = state
        self.kind = kind

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        ids = unlabelled(datastore)
        res = score_images(self.state, datastore, self.kind, ids, progress=True)
        keep = datastore.current_image_ids() if hasattr(datastore, "current_image_ids") else set(datastore.list_images())
        dropped = self.state.drop_scores_except(keep)
        if dropped:
            logger.info(f"scores of {dropped} image(s) no longer in the datastore dropped")
        return {"method": self.kind, "model_version": self.state.model_version(), "scored": len(res),
                "unlabelled": len(ids), "scores": {k: v["value"] for k, v in res.items()}}
