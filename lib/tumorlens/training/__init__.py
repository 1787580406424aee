"""Training of dual-head networks: joint classification + segmentation loss, grouped validation."""

from tumorlens.training.train import train

__all__ = ["train"]
