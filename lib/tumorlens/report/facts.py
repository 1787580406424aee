"""The facts a report may state, taken from one findings record.

One place turns the record into (a) short fact sentences for the prompt and the template, (b) the
sets the verifier checks against (classes, sides, regions, numbers). Keeping both in one object
means the template can never state something the verifier would not accept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tumorlens.caveats import HEAD_TEMPLATE_FAILED, IN_COLOUR, NO_DARK_BORDER, REGIONS_NOT_REQUESTED
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
UNFAMILIAR_REASON = "The image is unlike the images the model was trained on"


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
        reasons = scope + ([UNFAMILIAR_REASON] if self.unfamiliar else [])
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
        if self.single_slice:
            sp = " x ".join(_fmt(s, 1) for s in self.spacing)
            return f"a one-slice {self.modality} volume ({dims} voxels, spacing {sp} mm), read as a single 2D slice"
        if self.kind == "volume":
            sp = " x ".join(_fmt(s, 1) for s in self.spacing)
            return f"a 3D {self.modality} volume ({dims} voxels, spacing {sp} mm)"
        if self.spacing_known:
            sp = " x ".join(_fmt(s, 2) for s in self.spacing)
            return f"a single 2D {self.modality} image ({dims} pixels, spacing {sp} mm)"
        return f"a single 2D {self.modality} image ({dims} pixels, pixel spacing unknown)"

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

    def sentence_size(self) -> str | None:
        if self.mask_source is None:
            return None
        src = ("segmentation head" if self.mask_source == "segmentation_head"
               else f"saliency map ({SALIENCY_NAMES.get(self.mask_source.split(':')[-1], self.mask_source)})")
        if self.mask_empty:
            return f"The lesion mask from the {src} is empty."
        unit = "voxels" if self.kind == "volume" else "pixels"
        if self.kind == "volume" and self.volume_mm3 is not None:
            size = f"{self.mask_voxels} {unit}, {self.volume_mm3 / 1000.0:.1f} cm3"
        elif self.spacing_known and self.area_mm2 is not None:
            size = f"{self.mask_voxels} {unit}, {self.area_mm2:.0f} mm2"
        else:
            size = f"{self.mask_voxels} {unit}; physical size unknown because the pixel spacing is unknown"
        ext = ""
        if self.extents_mm and (self.kind == "volume" or self.spacing_known):
            ext = f", extent {' x '.join(f'{e:.0f}' for e in self.extents_mm)} mm"
        return f"The lesion mask from the {src} covers {size}{ext}."

    def sentence_location(self) -> str:
        if not self.tumour_present:
            return "No lesion location is reported because the classifier favours the no-tumour class."
        if self.low_confidence_placement or not self.regions:
            why = ("the atlas placement is low-confidence" if self.low_confidence_placement
                   else "they were not requested" if any(REGIONS_NOT_REQUESTED in n for n in self.notes)
                   else "no atlas regions were found")
            side = f" The lesion lies on the {self.laterality} side." if self.laterality in ("left", "right") else ""
            return f"No atlas regions are named because {why}.{side}"
        regs = ", ".join(f"{r['hemisphere'] + ' ' if r['hemisphere'] in ('left', 'right') else ''}{r['name']} "
                         f"({100 * r['fraction']:.0f}% of the lesion)" for r in self.listed_regions[:4])
        if self.laterality in ("left", "right"):
            side = f"The lesion lies in the {self.laterality} hemisphere"
        elif self.laterality == "bilateral":
            side = "The lesion lies in both hemispheres"
        elif self.laterality == "midline":
            side = "The lesion lies at the midline"
        else:
            side = "The lesion side is uncertain"
        if self.crosses_midline is True and self.laterality != "bilateral":
            side += " and crosses the midline"
        elif self.crosses_midline is False:
            side += " and does not cross the midline"
        return f"{side}. Atlas regions: {regs}."

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
            out.append("The tumour type was settled by a second classifier that looks only at the lesion, against "
                       "the whole-slice network's first choice.")
        if self.text_matches and self.text_matches[0]["class_name"] != self.label:
            out.append("The clinical description closest to the image belongs to another class than the one "
                       "reported.")
        out.append("Saliency maps show where the model looked and are only approximate outlines.")
        return out


def _numbers_in(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text)]


def build_facts(findings: Any) -> Facts:
    """:class:`Facts` from a findings record (``Findings``, dict or path)."""
    f = load_findings(findings)
    cls = f.classification
    masks = list(f.masks)
    src = f.lesion.mask_source if f.lesion.mask_source and f.lesion.mask_source != "none" else None
    mask = next((m for m in masks if m.source == src), None) if src else None
    if mask is None:
        mask = next((m for m in masks if m.source == "segmentation_head"), masks[0] if masks else None)
    extents: list[float] = []
    if mask is not None and mask.bbox is not None:
        extents = [(b - a + 1) * s for a, b, s in zip(mask.bbox.min, mask.bbox.max, f.input.spacing_mm, strict=False)]
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
        extents_mm=extents,
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
        text_matches=[t.model_dump() for t in f.text_matches],
        window_changed_type=bool(cls.window_opinion is not None and cls.window_opinion.changed_label),
    )
    facts.numbers = _allowed_numbers(facts)
    return facts


UNIT_KINDS = {"%": "percent", "percent": "percent", "mm": "mm", "cm": "cm", "mm2": "mm2", "mm²": "mm2",
              "mm^2": "mm2", "cm2": "cm2", "cm²": "cm2", "mm3": "mm3", "mm³": "mm3", "cm3": "cm3", "cm³": "cm3",
              "ml": "cm3", "year": "years", "years": "years", "-year": "years"}


def numbers_for_unit(f: Facts, unit: str, size: bool) -> list[float] | None:
    """The numbers a value with ``unit`` may take (None: unitless, any supported number). A length
    said as a size ("measures", "diameter") must be an extent of the mask; an age must be the age or
    a number of the history: a probability said in millimetres is not supported."""
    kind = UNIT_KINDS.get(unit)
    if kind is None:
        return None
    context = _numbers_in(f.patient.clinical_history or "") + [x for n in f.notes for x in _numbers_in(n)]
    if kind == "percent":
        nums = [100 * p for p in f.probabilities.values()] + [100 * r["fraction"] for r in f.regions]
        nums += [r["max_probability"] for r in f.regions]
        nums += [100 * v for v in (f.placement_confidence, f.placement_quality) if v is not None]
        if f.saliency_percentile is not None:
            nums += [f.saliency_percentile, 100 - f.saliency_percentile]
        return nums + context
    if kind == "years":
        return ([float(f.patient.age)] if f.patient.age is not None else []) + context
    if kind in ("mm", "cm"):
        nums = list(f.extents_mm)
        if not size:  # positions and voxel sizes are lengths too, but not sizes of the lesion
            # only lengths the history or notes give in mm ("confidence 0.02 < 0.5" is no 0.5 mm)
            texts = [f.patient.clinical_history or "", *f.notes]
            in_mm = [float(x) for t in texts for x in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s*mm\b", t)]
            in_mm += [10.0 * float(x) for t in texts for x in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s*cm\b", t)]
            nums += (list(f.spacing) if f.spacing_known else []) + [abs(c) for c in f.centroid or []] + in_mm
        return nums if kind == "mm" else [v / 10.0 for v in nums]
    area, vol = f.area_mm2, f.volume_mm3
    return {"mm2": [area] if area is not None else [], "cm2": [area / 100.0] if area is not None else [],
            "mm3": [vol] if vol is not None else [], "cm3": [vol / 1000.0] if vol is not None else []}[kind]


def _allowed_numbers(f: Facts) -> list[float]:
    """Every number the findings support, in the units a report might use."""
    nums: list[float] = [len(CLASS_NAMES), len(f.regions), MAX_ENTROPY, f.entropy, f.mask_voxels]
    for p in f.probabilities.values():
        nums += [p, 100 * p]
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
    if f.centroid:
        nums += [abs(c) for c in f.centroid]
    if f.patient.age is not None:
        nums.append(float(f.patient.age))
    if f.patient.clinical_history:
        nums += _numbers_in(f.patient.clinical_history)
    for n in f.notes:
        nums += _numbers_in(n)
    return nums
