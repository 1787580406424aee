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
NOT_THE_HEAD = "the file is not of the head"
# DICOM Body Part Examined: a value naming one of these parts (DICOM PS3.16 Annex L and common free text) and nothing
# of the head says the file is not of the head. Anything else — head words (BRAIN, CEREBELLUM, "MRA HEAD", HEAD^NECK),
# placeholders (UNKNOWN, OTHER, "-"), or a part not listed — raises no caution: an outside probe (session 40) found
# real brain MRI tagged BRAINSTEM, HYPOPHYSIS or UNKNOWN called "not of the head" by a first list of head words.
NOT_HEAD_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "ABDOMINAL", "ANKLE", "AORTA", "ARM", "BLADDER", "BREAST", "BOWEL", "CALF", "CHEST",
    "CHESTABDOMEN", "CHESTABDPELVIS", "CLAVICLE", "COCCYX", "COLON", "CSPINE", "ELBOW", "EXTREMITY", "FEMUR", "FINGER",
    "FOOT", "FOREARM", "GALLBLADDER", "HAND", "HEART", "HIP", "HUMERUS", "KIDNEY", "KIDNEYS", "KNEE", "LEG", "LIVER",
    "LSPINE", "LUNG", "LUNGS", "MEDIASTINUM", "OVARY", "PANCREAS", "PELVIS", "PROSTATE", "RECTUM", "RIB", "RIBS",
    "SACRUM", "SCAPULA", "SHOULDER", "SPINE", "SPLEEN", "SSPINE", "STERNUM", "TESTIS", "THIGH", "THORAX", "THUMB",
    "TIBIA", "TOE", "TSPINE", "UTERUS", "WRIST", "HEPATIC", "RENAL", "CARDIAC", "LUMBAR", "THORACIC", "CERVICAL"})
HEAD_PART_WORDS = frozenset({"HEAD", "BRAIN", "SKULL", "CRANIUM", "NEURO", "CEREBRUM", "CEREBELLUM", "BRAINSTEM",
                             "HYPOPHYSIS", "PITUITARY", "SELLA", "ORBIT", "ORBITS", "IAC", "FACE", "SINUS", "SINUSES",
                             "TEMPORAL", "INTRACRANIAL", "CRANIAL", "NEUROCRANIUM", "WHOLEBODY", "WHOLE"})
# the widest a head's foreground is across (the volumes' slab check, ``SLAB_HEAD_MM``): a 2D slice of known pixel
# spacing whose foreground is wider is not a head (a real abdominal MR slice: 179 x 112 mm "lesion", 350 mm across)
HEAD_MAX_WIDTH_MM = 280.0


def not_a_head_note(why: str) -> str:
    """The findings note for a volume that no pose fits to the head template (``why``: the evidence)."""
    return f"{HEAD_TEMPLATE_FAILED} ({why}): the volume may not be a head MRI, or may cover only part of the head"


def body_part_note(body_part: str | None) -> str | None:
    """The caveat for a file whose recorded body part (DICOM Body Part Examined) is not the head; None without one
    (a DICOM with BodyPartExamined ABDOMEN holding an abdominal slice was read as meningioma 0.98 with no caution)."""
    import re

    part = " ".join(str(body_part or "").split()).upper()
    words = set(re.findall(r"[A-Z]+", part)) | {part.replace(" ", "")}
    if not words & NOT_HEAD_PARTS or words & HEAD_PART_WORDS:
        return None
    return (f"{NOT_THE_HEAD}: it records the body part {part}; the model was trained on brain MRI only, so its class "
            "and mask mean little here")


def slice_width_note(width_mm: float | None) -> str | None:
    """The caveat for a 2D slice of known pixel spacing whose foreground is wider than any head; None otherwise."""
    if width_mm is None or width_mm <= HEAD_MAX_WIDTH_MM:
        return None
    return (f"{NOT_THE_HEAD}: its foreground is {width_mm:.0f} mm across, wider than any head "
            f"({HEAD_MAX_WIDTH_MM:.0f} mm); the model was trained on brain MRI only, so its class and mask mean "
            "little here")


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
