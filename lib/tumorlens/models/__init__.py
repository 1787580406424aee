"""Dual-head networks (class + tumour mask) and the registry of trained checkpoints."""

from tumorlens.models.dualhead import BACKBONES, DualHeadNet, build_model
from tumorlens.models.registry import LoadedModel, list_models, load_model, save_checkpoint

__all__ = ["BACKBONES", "DualHeadNet", "LoadedModel", "build_model", "list_models", "load_model", "save_checkpoint"]
