"""The facts a report may state, taken from one findings record.

One place turns the record into (a) short fact sentences for the prompt and the template, (b) the
sets the verifier checks against (classes, sides, regions, numbers). Keeping both in one object
means the template can never state something the verifier would not accept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tumorlens.caveats import (
    HEAD_TEMPLATE_FAILED,
    IN_COLOUR,
    NO_DARK_BORDER,
    NOT_THE_HEAD,
    REGIONS_NOT_REQUESTED,
)
from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES, NO_TUMOUR
from tumorlens.report.sanitize import PatientContext, sanitize_patient

READABLE_CLASS = {"glioma": "glioma", "meningioma": "meningioma", "pituitary": "pituitary tumour",
                  "no_tumor": "no-tumour class"}
SALIENCY_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM"}
PLACEMENT_NAMES = {"mni_registration": "registration to the MNI152 template",
                   "template_slice": "matching to an MNI152 template slice", "none": "none"}
MAX_ENTROPY = math.log(len(CLASS_NAMES))
# a region holding less of the lesion is not named in the report (a 160 ml mask touched 70 regions, 60 of
# them by a sliver); the findings record keeps them all
LISTED_REGION_FRACTION = 0.01
# below this share of the outline inside the salient area, the report says the two part ways
OUTLINE_MISSED = 0.25
UNFAMILIAR_REASON = "The image is unlike the images the model was trained on"
# a volume is read slice by slice by the 2D network, which calls a healthy template a glioma: the class must not lead
# the impression unqualified (an outside probe, session 38: a healthy ICBM152 volume's impression said glioma and
# named its location, the caution only under Limitations)
VOLUME_REASON = "The volume was read slice by slice by a network trained on 2D slices, which scores healthy brains " \
                "like diseased ones on such volumes"


def load_findings(findings: Any, source: str | Path | None = None):
    """A validated ``Findings`` from a record, a dict or a path (typed error naming the file)."""
    from tumorlens.findings import Findings

    if isinstance(findings, Findings):
        return findings
    if isinstance(findings, (str, Path)):
        return Findings.load(findings)
    if isinstance(findings, dict):
        return Findings.from_dict(findings, source=source)
    raise InvalidInputError(source, f"expected a findings record, got {type(findings).__name__}")


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


@dataclass
class Facts:
    """Everything a report may say, in the forms the prompt, template and verifier need."""

    label: str
    probabilities: dict[str, float]
    entropy: float
    kind: str
    modality: str
    dims: list[int]
    spacing: list[float]
    spacing_known: bool
    mask_source: str | None
    mask_empty: bool
    mask_voxels: int
    area_mm2: float | None
    volume_mm3: float | None
    extents_mm: list[float]
    regions: list[dict]
    laterality: str
    crosses_midline: bool | None
    centroid: list[float] | None
    placement_method: str
    placement_confidence: float | None
    placement_quality: float | None
    low_confidence_placement: bool
    saliency_method: str | None
    saliency_percentile: float | None
    notes: list[str]
    patient: PatientContext
    unfamiliar: bool  # the image is unlike the model's training images (classification.familiarity)
    model_name: str
    numbers: list[float] = field(default_factory=list)
    # the clinical descriptions the image matched in the model's text space (findings.text_matches)
    text_matches: list[dict] = field(default_factory=list)
    # the lesion-window classifier named another tumour type than the whole-slice network alone
    # (findings.classification.window_opinion.changed_label)
    window_changed_type: bool = False
    # the segmentation head's outline when the regions come from a saliency mask: the tumour's size is the
    # outline's, and the saliency mask (several times larger: where the classifier looked) is said to be that
    seg_voxels: int | None = None
    seg_area_mm2: float | None = None
    seg_volume_mm3: float | None = None
    seg_extents_mm: list[float] = field(default_factory=list)
    # the whole-slice network's own first choice when the window classifier changed it (label, probability)
    network_choice: tuple[str, float] | None = None
    # text matches of the record that are none of the model's class descriptions (hand-edited): not quoted
    unquoted_descriptions: int = 0
    # the file records no modality (a picture, NIfTI, NRRD): "MR" is the reader's assumption, said as such
    modality_assumed: bool = False
    # share of the segmentation head's outline inside the salient area (findings.saliency.outline_inside_fraction)
    outline_inside: float | None = None
    # the familiarity score and its threshold (a familiar image's too: only an unfamiliar one's were in the notes)
    familiarity_numbers: list[float] = field(default_factory=list)

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def tumour_present(self) -> bool:
        return self.label != NO_TUMOUR

    @property
    def top_probability(self) -> float:
        return self.probabilities[self.label]

    @property
    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])

    @property
    def listed_regions(self) -> list[dict]:
        """The regions a report names: those holding at least ``LISTED_REGION_FRACTION`` of the lesion."""
        return [r for r in self.regions if r["fraction"] >= LISTED_REGION_FRACTION]

    @property
    def region_names(self) -> list[str]:
        return [r["name"] for r in self.regions]

    @property
    def allowed_sides(self) -> set[str]:
        sides = {r["hemisphere"] for r in self.regions if r["hemisphere"] in ("left", "right", "midline")}
        if self.laterality in ("left", "right", "midline"):
            sides.add(self.laterality)
        if self.laterality == "bilateral":
            sides |= {"left", "right", "bilateral"}
        if self.crosses_midline:
            sides |= {"bilateral", "midline"}
        return sides

    def out_of_scope(self) -> list[str]:
        """Why the input may not be what the model reads at all (not an MRI, not a head), from the findings'
        notes: each reason, without a final full stop."""
        out = []
        if any("the model was trained on MRI only" in n for n in self.notes):
            out.append(f"The file is not an MRI ({self.modality}); the model was trained on MRI only")
        if any(IN_COLOUR in n for n in self.notes):
            out.append("The image is in colour, while MRI slices are grey")
        if any(NO_DARK_BORDER in n for n in self.notes):
            out.append("The image does not show a head in dark surroundings, as an MRI slice does")
        part = next((n for n in self.notes if n.startswith(NOT_THE_HEAD)), None)
        if part:
            out.append("The file is not of the head (" + part.split(": ", 1)[1].split(";")[0] + ")")
        if any(HEAD_TEMPLATE_FAILED in n for n in self.notes):
            out.append("The volume could not be matched to a head template; it may not be a brain MRI, or may "
                       "cover only part of the head")
        return out

    def scope_caution(self) -> str | None:
        """The sentence that leads the impression when the input may be out of scope, or is unlike the
        training images (1 % of the validation images; a knee slice; the bundled skull-stripped volume): the
        class that follows is the network's answer to an input it may not be made for, and a reader of the
        impression alone (the part people read) must not take it as a finding."""
        scope = self.out_of_scope()
        reasons = scope + ([UNFAMILIAR_REASON] if self.unfamiliar else []) + \
            ([VOLUME_REASON] if self.kind == "volume" and not self.read_as_slice else [])
        if not reasons:
            return None
        consequence = "may not apply" if scope else "may not be reliable"
        return f"Caution: {'; '.join(r[0].lower() + r[1:] for r in reasons)}, so the classification {consequence}."

    # ---- fact sentences ----------------------------------------------------------------------------
    @property
    def single_slice(self) -> bool:
        """A volume file of one slice: every stage reads it as a 2D slice (the atlas notes say so)."""
        return self.kind == "volume" and 1 in self.dims

    @property
    def read_as_slice(self) -> bool:
        return self.kind == "image2d" or self.single_slice

    def sentence_image(self) -> str:
        dims = " x ".join(str(d) for d in self.dims)
        # a picture, NIfTI or NRRD file keeps no modality: the report must not state "MR" as read from the file
        mod, assumed = ("", f"; the file records no modality, read as {self.modality}") if self.modality_assumed \
            else (f"{self.modality} ", "")
        if self.single_slice:
            sp = " x ".join(_fmt(s, 1) for s in self.spacing)
            return f"a one-slice {mod}volume ({dims} voxels, spacing {sp} mm{assumed}), read as a single 2D slice"
        if self.kind == "volume":
            sp = " x ".join(_fmt(s, 1) for s in self.spacing)
            return f"a 3D {mod}volume ({dims} voxels, spacing {sp} mm{assumed})"
        if self.spacing_known:
            sp = " x ".join(_fmt(s, 2) for s in self.spacing)
            return f"a single 2D {mod}image ({dims} pixels, spacing {sp} mm{assumed})"
        return f"a single 2D {mod}image ({dims} pixels, pixel spacing unknown{assumed})"

    def sentence_class(self) -> str:
        others = ", ".join(f"{READABLE_CLASS[c]} {_fmt(p)}" for c, p in self.ranked if c != self.label)
        if self.tumour_present:
            head = f"The classifier favours {READABLE_CLASS[self.label]} (probability {_fmt(self.top_probability)})"
        else:
            head = f"The classifier favours the no-tumour class (probability {_fmt(self.top_probability)})"
        return f"{head}; other classes: {others}."

    @property
    def uncertainty_level(self) -> str:
        """low / moderate / high: the entropy's third of its range (the words the template and verifier share)."""
        return "low" if self.entropy < 0.35 * MAX_ENTROPY else ("moderate" if self.entropy < 0.7 * MAX_ENTROPY else "high")

    def sentence_uncertainty(self) -> str:
        return (f"Classifier uncertainty is {self.uncertainty_level} (entropy {_fmt(self.entropy)} of at most "
                f"{_fmt(MAX_ENTROPY)}).")

    def _size(self, voxels: int, area: float | None, volume: float | None, extents: list[float]) -> str:
        unit = "voxels" if self.kind == "volume" else "pixels"
        if self.kind == "volume" and volume is not None:
            size = f"{voxels} {unit}, {volume / 1000.0:.1f} cm3"
        elif self.spacing_known and area is not None:
            size = f"{voxels} {unit}, {area:.0f} mm2"
        else:
            size = f"{voxels} {unit}; physical size unknown because the pixel spacing is unknown"
        if extents and (self.kind == "volume" or self.spacing_known):
            size += f", extent {' x '.join(f'{e:.0f}' for e in extents)} mm"
        return size

    @property
    def regions_from_saliency(self) -> bool:
        return bool(self.mask_source and self.mask_source.startswith("saliency"))

    def sentence_size(self) -> str | None:
        if self.mask_source is None:
            return None
        if not self.regions_from_saliency:
            if self.mask_empty:
                return "The lesion mask from the segmentation head is empty."
            return (f"The lesion mask from the segmentation head covers "
                    f"{self._size(self.mask_voxels, self.area_mm2, self.volume_mm3, self.extents_mm)}.")
        method = SALIENCY_NAMES.get(self.mask_source.split(":")[-1], self.mask_source)
        if self.seg_voxels is None:
            seg = ""
        elif self.seg_voxels == 0:
            seg = "The segmentation head outlines no lesion. "
        else:
            seg = (f"The segmentation head outlines the lesion: "
                   f"{self._size(self.seg_voxels, self.seg_area_mm2, self.seg_volume_mm3, self.seg_extents_mm)}. ")
        if self.mask_empty:
            return f"{seg}The {method} map's salient area is empty."
        return (f"{seg}The {method} map's salient area, which shows where the classifier looked, covers "
                f"{self._size(self.mask_voxels, self.area_mm2, self.volume_mm3, self.extents_mm)}."
                f"{self._outline_overlap()}")

    def _outline_overlap(self) -> str:
        """How much of the outlined lesion the salient area holds: the regions named next are the salient area's,
        and when it missed the outline (a turned volume's map moved to the other hemisphere) they are not the
        lesion's."""
        if self.outline_inside is None:
            return ""
        share = f" It holds {100 * self.outline_inside:.0f}% of the outlined lesion."
        if self.outline_inside < OUTLINE_MISSED:
            share += (" The salient area largely misses the outline, so its regions describe where the classifier "
                      "looked rather than the outlined lesion.")
        return share

    def sentence_location(self) -> str:
        if not self.tumour_present:
            return "No lesion location is reported because the classifier favours the no-tumour class."
        if self.low_confidence_placement or not self.regions:
            why = ("the atlas placement is low-confidence" if self.low_confidence_placement
                   else "they were not requested" if any(REGIONS_NOT_REQUESTED in n for n in self.notes)
                   else "no atlas regions were found")
            area = "salient area" if self.regions_from_saliency else "lesion"
            side = f" The {area} lies on the {self.laterality} side." if self.laterality in ("left", "right") else ""
            return f"No atlas regions are named because {why}.{side}"
        what = "salient area" if self.regions_from_saliency else "lesion"
        regs = ", ".join(f"{r['hemisphere'] + ' ' if r['hemisphere'] in ('left', 'right') else ''}{r['name']} "
                         f"({100 * r['fraction']:.0f}% of the {what})" for r in self.listed_regions[:4])
        area = "The salient area" if self.regions_from_saliency else "The lesion"
        if self.laterality in ("left", "right"):
            side = f"{area} lies in the {self.laterality} hemisphere"
        elif self.laterality == "bilateral":
            side = f"{area} lies in both hemispheres"
        elif self.laterality == "midline":
            side = f"{area} lies at the midline"
        else:
            side = f"{area}'s side is uncertain"
        if self.crosses_midline is True and self.laterality != "bilateral":
            side += " and crosses the midline"
        elif self.crosses_midline is False:
            side += " and does not cross the midline"
        return f"{side}. Atlas regions{' of the salient area' if self.regions_from_saliency else ''}: {regs}."

    def sentence_method(self) -> str:
        parts = [f"Dual-head CNN ({self.model_name}) classification with a segmentation head"]
        if self.saliency_method:
            parts.append(f"{SALIENCY_NAMES.get(self.saliency_method, self.saliency_method)} saliency")
        if self.placement_method != "none":
            conf = f", confidence {_fmt(self.placement_confidence)}" if self.placement_confidence is not None else ""
            parts.append(f"atlas placement by {PLACEMENT_NAMES[self.placement_method]}{conf}")
        return "; ".join(parts) + "."

    def fact_lines(self) -> list[str]:
        """The facts as short lines for the prompt (the only facts the model may use)."""
        lines = [f"Image: {self.sentence_image()}.", self.sentence_class(), self.sentence_uncertainty()]
        size = self.sentence_size()
        if size:
            lines.append(size)
        lines.append(self.sentence_location())
        return lines

    def history_limitations(self) -> list[str]:
        """What the clinical history puts outside the classifier's four classes: a cancer elsewhere (metastasis,
        then the leading alternative), earlier treatment (post-operative and post-radiation appearances). Not
        restated: the history is the requester's, and a report repeating it could carry what it should not."""
        history = (self.patient.clinical_history or "").lower()
        if not history or not self.tumour_present:
            return []
        out = []
        # the patient's own history, affirmed: not a relative's, not negated before or after the word
        said = [c for c in history_clauses(history) if not HISTORY_NEGATED.search(c) and not re.search(
            r"\b(?:family|mother|father|sister|brother|parent|sibling|aunt|uncle|grand\w*)\b", c)]
        if any(re.search(r"cancer|carcinoma|malignan|metasta|melanoma|lymphoma|sarcoma|oncolog|\bn?sclc\b|\bca\b", c)
               for c in said):
            out.append("The clinical history mentions a cancer; a metastasis, which would then be a leading "
                       "alternative, is not among the classifier's four classes.")
        if any(re.search(r"resect|operat|surgery|surgical|craniotomy|radiotherap|radiation|chemo|biops", c) for c in said):
            out.append("The clinical history mentions earlier treatment: post-treatment appearances were not in the "
                       "training images.")
        return out

    def limitations(self) -> list[str]:
        out = ["Automated research output from a machine-learning model; not a diagnosis."]
        if self.unfamiliar:
            out.append(f"{UNFAMILIAR_REASON}, so its classification may not be reliable.")
        if self.kind == "volume" and not self.single_slice:  # through the 2D network (tumorlens.inference.VOLUME_CAVEAT)
            what = "its class and lesion outline are" if self.tumour_present else "its class is"
            out.append("The volume was classified slice by slice by a network trained on 2D slices with the skull "
                       f"in view, so {what} unconfirmed.")
        out += [f"{s}, so nothing in this report may apply to it." for s in self.out_of_scope()]
        if self.read_as_slice:
            out.append("Single 2D image: structures outside this slice are not assessed.")
            if not self.spacing_known:
                out.append("Pixel spacing is unknown, so sizes are given in pixels only.")
        if self.low_confidence_placement:
            out.append("Atlas placement is low-confidence, so no anatomical regions are named.")
        elif self.regions and self.read_as_slice:
            out.append("Regions come from matching the image to an atlas template slice and are approximate.")
        if self.uncertainty_level == "high":
            out.append("The classifier is uncertain between classes.")
        if self.window_changed_type:
            first = (f" ({READABLE_CLASS.get(self.network_choice[0], self.network_choice[0])}, probability "
                     f"{_fmt(self.network_choice[1])})" if self.network_choice else "")
            out.append("The tumour type was settled by a second classifier that looks only at the lesion, against "
                       f"the whole-slice network's first choice{first}.")
        if self.text_matches and self.text_matches[0]["class_name"] != self.label:
            out.append("The clinical description closest to the image belongs to another class than the one "
                       "reported.")
        out += self.history_limitations()
        if self.unquoted_descriptions:
            out.append(f"{self.unquoted_descriptions} class description(s) in the findings are not among the model's "
                       "class descriptions, so they are not quoted.")
        out.append("Saliency maps show where the model looked and are only approximate outlines.")
        return out


# words that negate a clause of a clinical history ("denies seizures", "cancer screening negative")
HISTORY_NEGATED = re.compile(r"\b(?:no|not|denies|denied|without|negative|never|ruled out|excluded)\b")


def history_clauses(history: str) -> list[str]:
    return re.split(r"[.;,]|\bbut\b", history.lower())


def _numbers_in(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text)]


def _extents(mask, spacing) -> list[float]:
    """A mask's bounding-box extent per axis in mm (empty without a box)."""
    if mask is None or mask.bbox is None:
        return []
    return [(b - a + 1) * s for a, b, s in zip(mask.bbox.min, mask.bbox.max, spacing, strict=False)]


def build_facts(findings: Any) -> Facts:
    """:class:`Facts` from a findings record (``Findings``, dict or path)."""
    f = load_findings(findings)
    cls = f.classification
    masks = list(f.masks)
    src = f.lesion.mask_source if f.lesion.mask_source and f.lesion.mask_source != "none" else None
    mask = next((m for m in masks if m.source == src), None) if src else None
    if mask is None:
        mask = next((m for m in masks if m.source == "segmentation_head"), masks[0] if masks else None)
    seg = next((m for m in masks if m.source == "segmentation_head"), None) if mask is not None and mask.source != "segmentation_head" else None
    network_choice = None
    wo = cls.window_opinion
    if wo is not None and wo.changed_label and wo.network_probabilities:
        top = max(wo.network_probabilities, key=wo.network_probabilities.get)
        network_choice = (top, float(wo.network_probabilities[top]))
    regions = [
        {"label": r.label, "name": r.name, "hemisphere": r.hemisphere, "fraction": r.fraction,
         "max_probability": r.max_probability}
        for r in f.regions
    ]
    facts = Facts(
        label=cls.label,
        probabilities={c: float(cls.probabilities[c]) for c in CLASS_NAMES},
        entropy=float(cls.uncertainty.entropy),
        kind=f.input.kind,
        modality=f.input.modality or "MR",
        dims=list(f.input.dims),
        spacing=list(f.input.spacing_mm),
        spacing_known=bool(f.input.spacing_known),
        mask_source=mask.source if mask is not None else None,
        mask_empty=bool(mask.empty) if mask is not None else True,
        mask_voxels=int(mask.voxels) if mask is not None else 0,
        area_mm2=mask.area_mm2 if mask is not None else None,
        volume_mm3=mask.volume_mm3 if mask is not None else None,
        extents_mm=_extents(mask, f.input.spacing_mm),
        regions=regions,
        laterality=f.lesion.laterality,
        crosses_midline=f.lesion.crosses_midline,
        centroid=list(f.lesion.centroid_mni_mm) if f.lesion.centroid_mni_mm else None,
        placement_method=f.placement.method,
        placement_confidence=f.placement.confidence,
        placement_quality=f.placement.quality,
        low_confidence_placement=bool(f.placement.low_confidence),
        saliency_method=f.saliency.method if f.saliency else None,
        saliency_percentile=f.saliency.percentile if f.saliency else None,
        notes=list(f.notes),
        patient=sanitize_patient(f.patient),
        unfamiliar=bool(cls.familiarity is not None and not cls.familiarity.familiar),
        model_name=f.provenance.model,
        text_matches=[t.model_dump() for t in f.text_matches if _known_description(t.class_name, t.description)],
        window_changed_type=bool(cls.window_opinion is not None and cls.window_opinion.changed_label),
        seg_voxels=int(seg.voxels) if seg is not None else None,
        seg_area_mm2=seg.area_mm2 if seg is not None else None,
        seg_volume_mm3=seg.volume_mm3 if seg is not None else None,
        seg_extents_mm=_extents(seg, f.input.spacing_mm),
        network_choice=network_choice,
        modality_assumed=f.input.modality_from == "assumed",
        outline_inside=f.saliency.outline_inside_fraction if f.saliency else None,
        familiarity_numbers=([] if cls.familiarity is None else
                             [cls.familiarity.score, cls.familiarity.threshold]
                             + ([] if cls.familiarity.layer_score is None else
                                [cls.familiarity.layer_score, cls.familiarity.layer_threshold])),
    )
    facts.unquoted_descriptions = len(f.text_matches) - len(facts.text_matches)
    facts.numbers = _allowed_numbers(facts)
    return facts


@lru_cache(maxsize=1)
def _descriptions() -> dict[str, set[str]]:
    """Every class description of the prompt files shipped (``configs/prompts``), by class."""
    from tumorlens.alignment.prompts import load_descriptions
    from tumorlens.paths import configs_dir

    out: dict[str, set[str]] = {c: set() for c in CLASS_NAMES}
    for path in sorted((configs_dir() / "prompts").glob("*.y*ml")):
        try:
            for c, items in load_descriptions(path).items():
                out[c].update(items)
        except (InvalidInputError, OSError):
            continue
    return out


def _known_description(class_name: str, description: str) -> bool:
    """A record's text match is quoted only when it is one of the model's own class descriptions: the report
    printed a hand-edited "recommend urgent surgery" as a matched description, under "verified"."""
    known = _descriptions()
    return not any(known.values()) or description.strip() in known.get(class_name, set())


UNIT_KINDS = {"%": "percent", "percent": "percent", "mm": "mm", "cm": "cm", "mm2": "mm2", "mm²": "mm2",
              "mm^2": "mm2", "cm2": "cm2", "cm²": "cm2", "mm3": "mm3", "mm³": "mm3", "cm3": "cm3", "cm³": "cm3",
              "ml": "cm3", "year": "years", "years": "years", "-year": "years",
              "px": "count", "pixel": "count", "pixels": "count", "voxel": "count", "voxels": "count"}


def numbers_for_unit(f: Facts, unit: str, size: bool, salient: bool | None = None) -> list[float] | None:
    """The numbers a value with ``unit`` may take (None: unitless, any supported number). A length
    said as a size ("measures", "diameter") must be an extent of the mask; an age must be the age or
    a number of the history: a probability said in millimetres is not supported."""
    kind = UNIT_KINDS.get(unit)
    if kind is None:
        return None
    context = _numbers_in(f.patient.clinical_history or "") + [x for n in f.notes for x in _numbers_in(n)]
    if kind == "percent":
        nums = [100 * p for p in f.probabilities.values()] + [100 * r["fraction"] for r in f.regions]
        nums += [100 * (1.0 - f.probabilities[NO_TUMOUR])]
        nums += [r["max_probability"] for r in f.regions]
        nums += [100 * v for v in (f.placement_confidence, f.placement_quality) if v is not None]
        if f.saliency_percentile is not None:
            nums += [f.saliency_percentile, 100 - f.saliency_percentile]
        if f.outline_inside is not None:
            nums.append(100 * f.outline_inside)
        return nums + context
    # with regions from a saliency mask, a size is the outline's unless the sentence gives it to the salient area
    split = f.regions_from_saliency and f.seg_voxels is not None and salient is not None
    if kind == "count":  # a number of pixels or voxels is the mask's (or the outline's) count
        dims = [float(d) for d in f.dims]
        # (an outside probe, session 40: "The outline covers 4632 voxels", the salient area's count, passed)
        counts = ((f.mask_voxels,) if salient else (f.seg_voxels,)) if split else (f.mask_voxels, f.seg_voxels)
        return [float(v) for v in counts if v is not None] + dims + [float(math.prod(dims))] + context
    if kind == "years":
        return ([float(f.patient.age)] if f.patient.age is not None else []) + context
    if kind in ("mm", "cm"):
        nums = (list(f.extents_mm) if salient else list(f.seg_extents_mm)) if split and size else \
            list(f.extents_mm) + list(f.seg_extents_mm)
        if not size:  # positions and voxel sizes are lengths too, but not sizes of the lesion
            # only lengths the history or notes give in mm ("confidence 0.02 < 0.5" is no 0.5 mm)
            texts = [f.patient.clinical_history or "", *f.notes]
            in_mm = [float(x) for t in texts for x in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s*mm\b", t)]
            in_mm += [10.0 * float(x) for t in texts for x in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s*cm\b", t)]
            nums += (list(f.spacing) if f.spacing_known else []) + [abs(c) for c in f.centroid or []] + in_mm
        return nums if kind == "mm" else [v / 10.0 for v in nums]
    if split:
        areas = [a for a in ((f.area_mm2,) if salient else (f.seg_area_mm2,)) if a is not None]
        vols = [v for v in ((f.volume_mm3,) if salient else (f.seg_volume_mm3,)) if v is not None]
    else:
        areas = [a for a in (f.area_mm2, f.seg_area_mm2) if a is not None]
        vols = [v for v in (f.volume_mm3, f.seg_volume_mm3) if v is not None]
    return {"mm2": areas, "cm2": [a / 100.0 for a in areas], "mm3": vols, "cm3": [v / 1000.0 for v in vols]}[kind]


def _allowed_numbers(f: Facts) -> list[float]:
    """Every number the findings support, in the units a report might use."""
    nums: list[float] = [len(CLASS_NAMES), len(f.regions), MAX_ENTROPY, f.entropy, f.mask_voxels]
    if f.seg_voxels is not None:
        nums.append(f.seg_voxels)
    for v in (f.seg_area_mm2,):
        if v is not None:
            nums += [v, v / 100.0]
    if f.seg_volume_mm3 is not None:
        nums += [f.seg_volume_mm3, f.seg_volume_mm3 / 1000.0]
    for e in f.seg_extents_mm:
        nums += [e, e / 10.0]
    if f.network_choice:
        nums += [f.network_choice[1], 100 * f.network_choice[1]]
    for p in f.probabilities.values():
        nums += [p, 100 * p]
    p_tumour = 1.0 - f.probabilities[NO_TUMOUR]  # "the tumour classes together account for 0.03"
    nums += [p_tumour, 100 * p_tumour]
    for r in f.regions:
        nums += [r["fraction"], 100 * r["fraction"], r["max_probability"]]
    for v in (f.area_mm2,):
        if v is not None:
            nums += [v, v / 100.0]  # mm2 and cm2
    if f.volume_mm3 is not None:
        nums += [f.volume_mm3, f.volume_mm3 / 1000.0]  # mm3 and cm3 / ml
    for e in f.extents_mm:
        nums += [e, e / 10.0]
    nums += [float(d) for d in f.dims] + list(f.spacing)
    for v in (f.placement_confidence, f.placement_quality):
        if v is not None:
            nums += [v, 100 * v]
    if f.saliency_percentile is not None:
        nums += [f.saliency_percentile, 100 - f.saliency_percentile]
    if f.outline_inside is not None:
        nums += [f.outline_inside, 100 * f.outline_inside]
    if f.centroid:
        nums += [abs(c) for c in f.centroid]
    if f.patient.age is not None:
        nums.append(float(f.patient.age))
    if f.patient.clinical_history:
        nums += _numbers_in(f.patient.clinical_history)
    for n in f.notes:
        nums += _numbers_in(n)
    return nums
