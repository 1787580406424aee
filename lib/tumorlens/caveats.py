"""Note texts that one stage writes into the findings and a later stage (the report's limitations)
recognises; kept here, free of heavy imports, so both sides use the same words."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEAD_TEMPLATE_FAILED = "no pose matches the MNI152 head template"


def not_a_head_note(why: str) -> str:
    """The findings note for a volume that no pose fits to the head template (``why``: the evidence)."""
    return f"{HEAD_TEMPLATE_FAILED} ({why}): the volume may not be a head MRI, or may cover only part of the head"


def familiarity_note(fam: Mapping[str, Any]) -> str | None:
    """The note for an image the model finds unlike its training images (None when familiar)."""
    if fam["familiar"]:
        return None
    return (f"image is unlike the training images (familiarity {fam['score']:.2f} below the threshold "
            f"{fam['threshold']:.2f} set on validation images): the classification and masks may be unreliable")
