"""Active-learning core of the relabel loop: which image to label next, and fine-tuning on new labels.

No server code here: ``monai_app/`` wraps these functions as MONAI Label strategies, scoring
methods and a training task.
"""

from tumorlens.activelearning.disagreement import saliency_seg_disagreement
from tumorlens.activelearning.inputs import network_inputs
from tumorlens.activelearning.uncertainty import image_uncertainty, predictive_entropy
from tumorlens.activelearning.versions import ModelVersions

__all__ = ["ModelVersions", "image_uncertainty", "network_inputs", "predictive_entropy", "saliency_seg_disagreement"]
