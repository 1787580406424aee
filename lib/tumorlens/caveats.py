"""Note texts that one stage writes into the findings and a later stage (the report's limitations)
recognises; kept here, free of heavy imports, so both sides use the same words."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEAD_TEMPLATE_FAILED = "no pose matches the MNI152 head template"
IN_COLOUR = "the image is in colour"
# Share of pixels in colour above which a picture is not a grey MRI slice: every development slice is a grey
# JPEG (0); colour photographs measured 0.42-0.95 (astronaut, cat, coffee, retina, rocket), a star field 0.05;
# a few coloured annotation marks on a slice stay well under it.
COLOUR_MIN_FRACTION = 0.05


def not_a_head_note(why: str) -> str:
    """The findings note for a volume that no pose fits to the head template (``why``: the evidence)."""
    return f"{HEAD_TEMPLATE_FAILED} ({why}): the volume may not be a head MRI, or may cover only part of the head"


def colour_note(fraction: float | None) -> str | None:
    """The caveat for a picture in colour (``fraction``: the reader's ``colour_fraction``); None when grey."""
    if fraction is None or fraction < COLOUR_MIN_FRACTION:
        return None
    return (f"{IN_COLOUR} ({fraction:.0%} of its pixels): MRI slices are grey, so it may be a photograph or carry a "
            "colour overlay; the model was trained on grey MRI only")


def familiarity_note(fam: Mapping[str, Any]) -> str | None:
    """The note for an image the model finds unlike its training images (None when familiar)."""
    if fam["familiar"]:
        return None
    return (f"image is unlike the training images (familiarity {fam['score']:.2f} below the threshold "
            f"{fam['threshold']:.2f} set on validation images): the classification and masks may be unreliable")
