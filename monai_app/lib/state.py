"""Per-datastore state of the app: the versioned fine-tuned models and the active-learning scores.

It lives beside the datastore (``<studies>/.tumorlens/``, hidden from the datastore's file scan) so
a restart finds the same model version and scores; a DICOMweb datastore keeps it in a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from filelock import FileLock

from tumorlens.activelearning.versions import ModelVersions
from tumorlens.atomic import atomic_write_text
from tumorlens.models.registry import LoadedModel

logger = logging.getLogger(__name__)


def state_dir_for(studies: str, conf: dict) -> Path:
    if conf.get("state_dir") or os.environ.get("TUMORLENS_STATE_DIR"):
        return Path(conf.get("state_dir") or os.environ["TUMORLENS_STATE_DIR"])
    if studies.startswith(("http://", "https://")):
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tumorlens"
        return base / f"dicomweb-{hashlib.sha256(studies.encode()).hexdigest()[:12]}"
    return Path(studies) / ".tumorlens"


class AppState:
    """Model versions (``models/``), train stats and AL scores (``scores.json``) of one datastore."""

    def __init__(self, root: Path, base_model: str | None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._held = None
        self.versions = ModelVersions(self.root / "models", base_model)
        self.stats_file = self.root / "train_stats.json"
        self.scores_file = self.root / "scores.json"
        self._lock = FileLock(str(self.root / ".scores.lock"))

    def model(self) -> LoadedModel:
        return self.versions.load()

    def model_version(self) -> str:
        """The version answering now: the current one, or the one served in its place when it cannot load."""
        model = self.model()
        return self.versions.served or f"base:{model.version}"

    # ---- train stats -----------------------------------------------------------------------------
    def hold(self, studies: str | None = None) -> None:
        """One server per datastore: a second ``tumorlens serve`` on the same studies folder started without a word,
        and each server's label saves erased the other's from the index (an outside probe, session 40). The lock is
        the kernel's (``flock``), so a killed server leaves nothing to clean up. It is taken in the state folder and,
        for a local studies folder, in that folder's own ``.tumorlens`` too: a server given another state folder
        (``--conf state_dir``) had started on a folder another server held."""
        import fcntl

        if self._held is not None:
            return
        places = [self.root]
        if studies and not studies.startswith(("http://", "https://")):
            own = Path(studies) / ".tumorlens"
            if own.resolve() != self.root.resolve():
                try:
                    own.mkdir(parents=True, exist_ok=True)
                    places.append(own)
                except OSError:
                    logger.warning("the studies folder cannot hold a server lock (read-only?): only the state folder's "
                                   "is taken")
        held = []
        for place in places:
            f = open(place / "server.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                other = f.read().strip() or "another process"
                f.close()
                for g in held:
                    g.close()
                raise RuntimeError(f"this datastore is already served (server {other}): two servers on one studies "
                                   "folder overwrite each other's labels; stop that server, or serve a copy of the "
                                   "folder") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            held.append(f)
        self._held = held

    def read_stats(self) -> dict:
        try:
            return json.loads(self.stats_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_stats(self, stats: dict) -> None:
        atomic_write_text(self.stats_file, json.dumps(stats, indent=2, default=str))

    # ---- active-learning scores ------------------------------------------------------------------
    def read_scores(self) -> dict:
        try:
            return json.loads(self.scores_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def update_scores(self, new: dict[str, dict]) -> None:
        """Merge per-image entries (another process may write at the same time)."""
        with self._lock:
            cur = self.read_scores()
            for image_id, entry in new.items():
                cur.setdefault(image_id, {}).update(entry)
            atomic_write_text(self.scores_file, json.dumps(cur, indent=2))

    def drop_scores_except(self, keep: set[str]) -> int:
        """Forget the scores of images not in ``keep`` (deleted ones: every scored next-sample request reads the
        whole file, which had kept them all). Returns how many were dropped."""
        with self._lock:
            cur = self.read_scores()
            gone = [i for i in cur if i not in keep]
            if gone:
                atomic_write_text(self.scores_file, json.dumps({i: e for i, e in cur.items() if i in keep}, indent=2))
        return len(gone)
