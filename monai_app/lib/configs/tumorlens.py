"""Which tasks the app offers, built over one shared :class:`~lib.state.AppState`.

Conf keys (``monailabel start_server --conf KEY VALUE``): ``model`` (registry name or path of the
base model; default from ``configs/defaults.yaml``), ``state_dir`` (where model versions and scores
are kept), ``max_upload_mb`` (request size limit, default 512).
"""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning.strategies import RandomUnlabelled, ScoredStrategy
from lib.infers.classification import ClassificationInfer
from lib.infers.report import ReportInfer
from lib.infers.saliency import METHODS, SaliencyInfer
from lib.infers.segmentation import SegmentationInfer
from lib.scoring.scores import TumorlensScoring
from lib.state import AppState

TRAINER = "tumorlens"


def infers(state: AppState) -> dict[str, InferTask]:
    tasks: dict[str, InferTask] = {"classification": ClassificationInfer(state), "segmentation": SegmentationInfer(state)}
    for name in METHODS:
        tasks[name] = SaliencyInfer(state, name)
    tasks["report"] = ReportInfer(state)
    return tasks


def trainers(state: AppState) -> dict[str, TrainTask]:
    from lib.trainers.finetune import FinetuneTrainer

    return {TRAINER: FinetuneTrainer(state)}


def strategies(state: AppState) -> dict[str, Strategy]:
    return {
        "random": RandomUnlabelled(state),
        "uncertainty": ScoredStrategy(state, "uncertainty",
                                      "Highest predictive entropy (MC-dropout) among unlabelled images"),
        "saliency_disagreement": ScoredStrategy(state, "saliency_disagreement",
                                                "Where Grad-CAM and the segmentation head disagree most"),
    }


def scoring_methods(state: AppState) -> dict[str, ScoringMethod]:
    return {k: TumorlensScoring(state, k) for k in ("uncertainty", "saliency_disagreement")}
