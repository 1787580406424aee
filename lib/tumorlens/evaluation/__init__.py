"""Evaluation: classification, calibration and segmentation metrics on any manifest folder."""

from tumorlens.evaluation.metrics import classification_metrics, dice_score, expected_calibration_error

__all__ = ["classification_metrics", "dice_score", "expected_calibration_error"]
