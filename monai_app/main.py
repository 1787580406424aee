"""tumorlens as a MONAI Label app: ``monailabel start_server --app monai_app --studies DIR``
(or ``tumorlens serve``). Every task is a thin adapter over the ``tumorlens`` package.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import sys
from pathlib import Path

from lib.auth import install_token_check
from lib.concurrency import install_infer_threads
from lib.configs import tumorlens as tasks
from lib.datastore import TumorlensDatastore, in_temp_folder
from lib.errors import bad_request, check_id, conflict, not_found
from lib.limits import install_body_limit
from lib.log_redaction import install_log_redaction
from lib.request_checks import install_request_checks
from lib.sessions import TumorlensSessions
from lib.state import AppState, state_dir_for
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

import tumorlens

logger = logging.getLogger(__name__)


def in_server() -> bool:
    """Inside the server process, not one of the train/scoring subprocesses MONAI Label starts."""
    return "monailabel.app" in sys.modules


def end_with_the_server() -> None:
    """In a train/scoring subprocess: end when the server process does (Linux ``PR_SET_PDEATHSIG``). A scoring run
    had gone on without its server, writing the scores and index of a datastore nobody served; the server cannot
    stop it on the way out, since uvicorn ends it by re-raising the stop signal (no exit handlers run)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the run ends on its own
        return
    server = os.environ.get(SERVER_PID)
    if server and server.isdigit() and os.getppid() != int(server):  # the server ended before this was set
        os.kill(os.getpid(), signal.SIGTERM)


SERVER_PID = "TUMORLENS_SERVER_PID"  # set by the server for the subprocesses it starts


def in_task_subprocess() -> bool:
    """One of the train/scoring subprocesses MONAI Label starts (``python -m monailabel.interfaces.utils.app``)."""
    return Path(sys.argv[0]).as_posix().endswith("monailabel/interfaces/utils/app.py")


class TumorLensApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        self.state = AppState(state_dir_for(studies, conf), conf.get("model") or None)
        if in_server():
            self.state.hold(studies)  # before anything is swept or loaded: the folder may be another server's
        swept = self.state.versions.sweep()
        if swept:
            logger.warning(f"removed {swept} half-written model folder(s) of an interrupted training run")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="tumorlens",
                         description="Explainable brain-tumour MRI: class, tumour mask, saliency, atlas regions, report",
                         version=tumorlens.__version__ if hasattr(tumorlens, "__version__") else "0")
        if in_task_subprocess():
            end_with_the_server()
        if in_server():
            os.environ[SERVER_PID] = str(os.getpid())
            stats = self.state.read_stats()
            if stats.get("status") in ("STARTING", "RUNNING"):  # the server died while a run was going on
                current = self.state.versions.pointer().get("folder")
                written = [v for v in self.state.versions.versions() if current is None or v > current]
                note = ("the server stopped during this run; nothing was published" if not written else
                        f"the server stopped during this run after it wrote {written[-1]} but before making it "
                        f"current: {written[-1]} is listed, not served")
                stats.update(status="INTERRUPTED", note=note)
                self.state.write_stats(stats)
            mb = float(conf.get("max_upload_mb") or os.environ.get("TUMORLENS_MAX_UPLOAD_MB", 512))
            install_infer_threads(sys.modules["monailabel.app"].app)
            install_request_checks()
            install_body_limit(sys.modules["monailabel.app"].app, int(mb * 1024 * 1024))
            install_token_check()
            install_log_redaction()
            # GET /model/{name} guesses the type from the suffix; /etc/mime.types calls ".pt" a SNES page table
            mimetypes.add_type("application/octet-stream", ".pt")

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # -> _init_dicomweb_datastore below for a DICOMweb server
        from monailabel.config import settings

        # the folder is watched by the server only: a scoring run's own watcher saw the server's deletions as files
        # gone missing and kept their info, and rewrote the index from its own copy (MONAI Label turns the watcher
        # off for training runs only)
        store = TumorlensDatastore(self.studies, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD and in_server(),
                                   read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
        store.scores_file = self.state.scores_file
        return store

    def _load_sessions(self, load=False):
        if not load:
            return None
        from monailabel.config import settings

        return TumorlensSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def _init_dicomweb_datastore(self) -> Datastore:
        """MONAI Label's DICOMweb client (user/password and URL prefixes from its settings) under tumorlens'
        datastore (``lib.dicomweb``)."""
        from dicomweb_client.session_utils import create_session_from_user_pass
        from lib.dicomweb import TumorlensDicomWeb
        from monailabel.config import settings
        from monailabel.datastore.dicom import DICOMwebClientX

        self.studies = self.studies.rstrip("/").strip()
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=self.studies, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        store = TumorlensDicomWeb(client, settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache_path=cache,
                                  fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)
        store.scores_file = self.state.scores_file
        return store

    def _download_dcmqi_tools(self):
        """MONAI Label fetches dcmqi from GitHub for DICOM-SEG output; offline it cannot, and the
        tumorlens tasks return NIfTI/PNG labels, so the DICOMweb datastore starts without it."""
        logger.info("dcmqi download skipped (DICOM-SEG output not used by tumorlens)")

    def init_infers(self):
        return tasks.infers(self.state)

    def init_trainers(self):
        return tasks.trainers(self.state)

    def init_strategies(self):
        return tasks.strategies(self.state)

    def init_scoring_methods(self):
        return tasks.scoring_methods(self.state)

    def info(self):
        meta = super().info()
        meta["model_version"] = self.state.model_version()
        meta["model_versions"] = self.state.versions.versions()
        if self.state.versions.broken:  # the current version's checkpoint is damaged: another one answers
            meta["model_version_problem"] = (f"the current version cannot be loaded ({self.state.versions.broken}); "
                                             f"{meta['model_version']} answers in its place")
        return meta

    # ---- request checks MONAI Label leaves to the app ----------------------------------------------
    def infer(self, request, datastore=None):
        image = request.get("image")
        try:
            return self._checked_infer(request, datastore)
        except Exception:
            if isinstance(image, str) and self._is_upload(image):  # MONAI Label removes it only on success
                Path(image).unlink(missing_ok=True)
            raise

    def _checked_infer(self, request, datastore=None):
        model = request.get("model")
        task = self._infers.get(model)
        if task is None or not task.is_valid():
            raise not_found(f"unknown model {model!r}; available: {', '.join(k for k, v in self._infers.items() if v.is_valid())}")
        image = request.get("image")
        ds = datastore or self.datastore()
        request = dict(request)
        if isinstance(image, str):
            if not image:
                raise bad_request("no image: give a datastore image id, a live session id or send a file")
            if os.sep in image or image.startswith("."):
                # only paths MONAI Label itself wrote: the temporary file of an upload, or the image
                # of a session (PUT /session/, how Slicer sends a volume that is not in the datastore)
                if not (self._is_upload(image) or self._is_session_image(image, request)):
                    raise bad_request(f"invalid image id {image!r}: use a datastore image id or send a file")
            else:
                check_id(image)
                if not ds.get_image_uri(image):
                    raise not_found(f"unknown image id {image!r}")
                request["image_id"] = image
                self._check_label_kept(ds, image, request)
        return super().infer(request, datastore)

    @staticmethod
    def _check_label_kept(ds: Datastore, image: str, request: dict) -> None:
        """A prediction saved under the ``final`` tag (``save_label`` with ``label_tag: final``, as a
        batch inference can ask) must not replace an annotator's final label."""
        if not request.get("save_label"):
            return
        from monailabel.interfaces.datastore import DefaultLabelTag

        tag = getattr(request.get("label_tag"), "value", request.get("label_tag"))
        # MONAI Label saves a prediction with an empty tag as the final label, like one without a tag at all
        # here: an empty tag slipped past this check and replaced an annotator's outline
        if not str(tag or "").strip() and "label_tag" in request:
            tag = DefaultLabelTag.FINAL.value
        if tag == DefaultLabelTag.FINAL.value and ds.get_label_by_image_id(image, tag):
            raise conflict(f"{image} already has a final label; a model prediction is not saved over it "
                           "(save it under another label_tag)")

    def infer_wsi(self, request, datastore=None):
        """tumorlens has no whole-slide tasks: the WSI routes run the same checked inference as
        ``/infer`` (MONAI Label's path skips the model and image checks above)."""
        return self.infer(request, datastore)

    def batch_infer(self, request, datastore=None):
        """MONAI Label's batch inference spreads images over CUDA devices by default and divides by
        their number: on a machine without a GPU it runs on the CPU instead of failing. An image that
        already has the final label a ``label_tag: final`` run would replace is skipped (and named in
        the result) instead of ending the run there."""
        import torch
        from fastapi import HTTPException

        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False, "device": "cpu"}

        def infer_or_skip(req: dict, ds=None) -> dict:
            try:
                return self.infer(req, ds)
            except HTTPException as e:
                if e.status_code != 409:
                    raise
                logger.warning(e.detail)
                return {"skipped": e.detail}

        return self._batch_infer(request, datastore or self.datastore(), infer_or_skip)

    @staticmethod
    def _is_upload(image: str) -> bool:
        return Path(image).is_absolute() and in_temp_folder(image) and Path(image).is_file()

    def _is_session_image(self, image: str, request: dict) -> bool:
        """The image MONAI Label put in the request for ``session_id``: a file or a DICOM folder
        inside this server's session store."""
        sessions = self.sessions()
        if not request.get("session") or sessions is None:
            return False
        p, store = Path(image), Path(sessions.store_path).resolve()
        return p.is_absolute() and p.exists() and store in p.resolve().parents

    def async_scoring(self, method, params=None):
        """MONAI Label re-runs every scoring method (a process each, ~8 s of CPU) after every next-sample
        request and training run. Automatic runs (``method`` None) start only when some unlabelled
        image lacks a current score and no scoring run is already queued or running."""
        if method is None:
            from lib.scoring.scores import needs_scoring
            from monailabel.utils.async_tasks.utils import tasks

            busy = any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("scoring") or [])
            if busy or not needs_scoring(self.state, self.datastore()):
                return {}
        return super().async_scoring(method, params)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise not_found(f"unknown strategy {strategy!r}; available: {', '.join(self._strategies)}")
        return super().next_sample(request)

    def train(self, request):
        if request.get("model") not in self._trainers:
            raise not_found(f"unknown trainer {request.get('model')!r}; available: {', '.join(self._trainers)}")
        return super().train(request)

    def scoring(self, request, datastore=None):
        if request.get("method") not in self._scoring_methods:
            raise not_found(f"unknown scoring method {request.get('method')!r}; "
                            f"available: {', '.join(self._scoring_methods)}")
        return super().scoring(request, datastore)
