"""Note texts that one stage writes into the findings and a later stage (the report's limitations)
recognises; kept here, free of heavy imports, so both sides use the same words."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEAD_TEMPLATE_FAILED = "no pose matches the MNI152 head template"
IN_COLOUR = "the image is in colour"
REGIONS_NOT_REQUESTED = "atlas regions not requested"
# Share of pixels in colour above which a picture is not a grey MRI slice: every development slice is a grey
# JPEG (0); colour photographs measured 0.42-0.95 (astronaut, cat, coffee, retina, rocket), a star field 0.05;
# a few coloured annotation marks on a slice stay well under it.
COLOUR_MIN_FRACTION = 0.05
NO_DARK_BORDER = "almost none of the image's edge is dark background"
# Share of the picture's outer frame that is dark (``tumorlens.data.normalize.dark_border_fraction``) below
# which a 2D picture is not framed like an MRI slice of a head: development slices >= 0.53, frame-filling
# textures, documents and micrographs 0.00-0.12 (photographs with a backdrop: a clock 0.19, the astronaut 0.23, a brick wall 0.36).
DARK_BORDER_MIN = 0.25


def not_a_head_note(why: str) -> str:
    """The findings note for a volume that no pose fits to the head template (``why``: the evidence)."""
    return f"{HEAD_TEMPLATE_FAILED} ({why}): the volume may not be a head MRI, or may cover only part of the head"


def colour_note(fraction: float | None) -> str | None:
    """The caveat for a picture in colour (``fraction``: the reader's ``colour_fraction``); None when grey."""
    if fraction is None or fraction < COLOUR_MIN_FRACTION:
        return None
    return (f"{IN_COLOUR} ({fraction:.0%} of its pixels): MRI slices are grey, so it may be a photograph or carry a "
            "colour overlay; the model was trained on grey MRI only")


def dark_border_note(fraction: float | None) -> str | None:
    """The caveat for a 2D picture whose edge is not dark (``fraction``: its dark-border share); None when
    it is framed like an MRI slice, whose head lies in signal-free air."""
    if fraction is None or fraction >= DARK_BORDER_MIN:
        return None
    return (f"{NO_DARK_BORDER} ({fraction:.0%} of it): an MRI slice of a head shows dark air around the head, so "
            "the image may not be an MRI of a head, or is cropped inside the head")


def familiarity_note(fam: Mapping[str, Any]) -> str | None:
    """The note for an image the model finds unlike its training images (None when familiar)."""
    if fam["familiar"]:
        return None
    why = []
    if fam["score"] < fam["threshold"]:
        why.append(f"familiarity {fam['score']:.3f} below the threshold {fam['threshold']:.3f} set on validation images")
    if fam.get("layer_score") is not None and fam["layer_score"] > fam["layer_threshold"]:
        why.append(f"layer score {fam['layer_score']:.3f} above the threshold {fam['layer_threshold']:.3f} set on "
                   "validation images: its statistics at the network's inner layers are unlike theirs")
    return f"image is unlike the training images ({'; '.join(why)}): the classification and masks may be unreliable"
