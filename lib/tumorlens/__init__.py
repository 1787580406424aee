"""tumorlens: explainable brain-tumour MRI (dual-head networks, saliency, atlas regions, reports)."""

from tumorlens.labels import CLASS_NAMES, TUMOUR_CLASSES

__version__ = "0.1.0"
__all__ = ["CLASS_NAMES", "TUMOUR_CLASSES", "__version__"]
