"""Next-sample strategies over the datastore's images that cannot train the classifier yet (no final
label, or, once every image has one, a label that names no class): ``random``, ``uncertainty``
(highest MC-dropout predictive entropy) and ``saliency_disagreement`` (where Grad-CAM and the
segmentation head disagree most). Scores come from the scoring methods' store; images not scored
yet under the current model are scored on the spot (at most ``max_compute`` per request).

Annotators working side by side must not be handed the same image: MONAI Label records every pick in
the image's info (``strategy: {name: {ts, client_id}}``) and its own Epistemic strategy serves the
least recently picked of its top images. Here an image picked under any strategy within the last
``hold_seconds`` (default a day, MONAI Label's reset) is passed over while another candidate is free;
when every candidate is held, the one picked longest ago is served again. MONAI Label stamps a pick in whole
seconds, so the server also keeps its own picks to the microsecond (``note_pick``): two picks in one second had
both counted as the oldest, and the image just handed out went to the next annotator as well."""

from __future__ import annotations

import random
import threading
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.datastore import training_gaps
from lib.errors import bad_request, conflict
from lib.scoring.scores import image_uri, mark_unusable, score_images, unusable
from lib.state import AppState


def seed_param(request: dict) -> int | str | None:
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | str)):
        raise bad_request(f"seed must be a whole number or a string, got {seed!r}")
    return seed


HOLD_SECONDS = 24 * 60 * 60


def whole_number_param(request: dict, key: str, default: int, meaning: str) -> int:
    """``request[key]`` as a whole number >= 0 (``default`` when absent), else a 400 saying what it means."""
    value = request.get(key)
    if value is None:
        return default
    try:
        n = int(value)
        ok = not isinstance(value, bool) and float(value) == n and n >= 0
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise bad_request(f"{key} must be a whole number >= 0 ({meaning}), got {value!r}")
    return n


def hold_param(request: dict) -> int:
    return whole_number_param(request, "hold_seconds", HOLD_SECONDS, "how long a picked image is kept from other picks")


_recent_picks: dict[str, float] = {}  # this server's picks, exact (MONAI Label's record is in whole seconds)
_pick_lock = threading.Lock()  # one pick at a time between choosing and noting it


def note_pick(image_id: str) -> None:
    _recent_picks[image_id] = time.time()


def last_picked(datastore: Datastore, ids: list[str]) -> dict[str, float]:
    """When each image was last handed out by any strategy (MONAI Label's record, or this server's own when
    later; 0 when never)."""
    out = {}
    for i in ids:
        record = datastore.get_image_info(i).get("strategy")
        stamps = [v.get("ts") for v in record.values() if isinstance(v, dict)] if isinstance(record, dict) else []
        stamps = [float(t) for t in stamps if isinstance(t, int | float) and not isinstance(t, bool)]
        out[i] = max(stamps + [_recent_picks.get(i, 0.0)])
    return out


def usable(state: AppState, datastore: Datastore, ids: list[str]) -> tuple[list[str], int]:
    """The candidates without a record that no model can read them, and how many were left out."""
    bad = unusable(state, datastore, ids)
    return [i for i in ids if i not in bad], len(bad)


def candidates(state: AppState, datastore: Datastore, gaps: dict[str, str]) -> tuple[list[str], int]:
    """The usable images without a final label; only when none is left, those whose final label names no
    class (an annotator who saved a mask in 3D Slicer's "tumor" segment was handed it back at once, its
    segments empty). Also returns how many were left out as unusable."""
    first = sorted(i for i, need in gaps.items() if need == "label")
    ids, skipped = usable(state, datastore, first)
    if ids:
        return ids, skipped
    ids, more = usable(state, datastore, sorted(i for i in gaps if i not in first))
    return ids, skipped + more


def free_first(ids: list[str], picked: dict[str, float], hold: int) -> tuple[list[str], int]:
    """The candidates not picked within ``hold`` seconds; when none is free, the one picked longest ago.
    Also returns how many were held back."""
    now = time.time()
    free = [i for i in ids if now - picked[i] >= hold]
    if free:
        return free, len(ids) - len(free)
    oldest = min(picked[i] for i in ids)
    return [i for i in ids if picked[i] == oldest], len(ids)


def max_compute_param(request: dict, default: int = 8) -> int:
    return whole_number_param(request, "max_compute", default, "images scored on the spot")


class RandomUnlabelled(Strategy):
    def __init__(self, state: AppState):
        super().__init__("A random unlabelled image not handed out lately (optional 'seed' for a reproducible pick)")
        self.state = state

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        gaps = training_gaps(datastore)
        ids, skipped = candidates(self.state, datastore, gaps)
        if not ids:
            return {}
        rng = random.Random(seed_param(request))
        hold = hold_param(request)
        for _ in range(8):  # a pick the datastore cannot give (a PACS series it refuses) is recorded, and another made
            with _pick_lock:
                pool, held = free_first(ids, last_picked(datastore, ids), hold)
                pick = rng.choice(pool)
                _uri, problem = image_uri(datastore, pick)
                if problem is None:
                    note_pick(pick)
            if problem is None:
                # no "strategy" key: MONAI Label adds its own record of past picks under that name to the answer
                return {"id": pick, "needs": gaps[pick], "candidates": len(ids), "held": held, "unusable": skipped}
            mark_unusable(self.state, datastore, pick, problem)
            ids.remove(pick)
            skipped += 1
            if not ids:
                return {}
        raise conflict("none of eight random picks could be read by the datastore; POST /scoring/uncertainty to "
                       "sort the unreadable images out, then ask again")


class ScoredStrategy(Strategy):
    def __init__(self, state: AppState, kind: str, description: str):
        super().__init__(description)
        self.state = state
        self.kind = kind

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        gaps = training_gaps(datastore)
        ids, skipped = candidates(self.state, datastore, gaps)
        if not ids:
            return {}
        limit = max_compute_param(request)
        hold = hold_param(request)
        scores = score_images(self.state, datastore, self.kind, ids, limit=limit)
        found = len(unusable(self.state, datastore, ids))  # unreadable ones met while scoring now
        skipped += found
        if not scores and found == len(ids):
            return {}
        if not scores:  # not "nothing left to label" ({}): there are unlabelled images, none scored yet
            raise conflict(f"none of the {len(ids)} unlabelled images has a {self.kind} score under the current "
                           f"model and max_compute={limit} allows none to be scored now: POST /scoring/{self.kind} "
                           "first, or ask with max_compute >= 1")
        with _pick_lock:
            pool, held = free_first(sorted(scores), last_picked(datastore, sorted(scores)), hold)
            pick = max(pool, key=lambda k: rank(scores[k], k))
            note_pick(pick)
        answer = {"id": pick, "needs": gaps[pick], "score_kind": self.kind, "score": scores[pick]["value"],
                  "model_version": scores[pick]["model_version"], "candidates": len(ids), "scored": len(scores),
                  "held": held, "unusable": skipped}
        if scores[pick].get("out_of_scope"):  # every candidate left is one: say why it is unlike the others
            answer["out_of_scope"] = scores[pick]["out_of_scope"]
        return answer


def rank(entry: dict, image_id: str) -> tuple:
    """Images the model was trained for first (a torso phantom, a CT or a crop is the least certain of all, and
    was handed out ahead of every brain volume), then the highest score."""
    return (not entry.get("out_of_scope"), entry["value"], image_id)
