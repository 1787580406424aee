"""The findings record: one versioned, validated JSON document per explained image.

Every later stage (report writer, MONAI Label app, Slicer module, alignment) reads this record and
nothing else, so it refuses what would mislead them: unknown labels, probabilities that do not sum
to one, region fractions outside [0, 1], regions named on a low-confidence placement, and anything
that looks like a patient identifier. ``extra="forbid"`` everywhere: a typo is an error, not a
silently dropped field.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tumorlens.atomic import atomic_write_text
from tumorlens.errors import InvalidInputError
from tumorlens.findings.identifiers import capitalised_names, find_identifiers
from tumorlens.labels import CLASS_NAMES, TUMOUR_CLASSES

SCHEMA_VERSION = "1.7"  # 1.1: classification.familiarity (optional); 1.2: classification.window_opinion (optional);
# 1.3: window_opinion.sharpness; 1.4: provenance.code_commit (optional); 1.5: input.modality_from (optional);
# 1.6: saliency.outline_inside_fraction (optional); 1.7: classification.familiarity.layer_score / layer_threshold
# (optional)
PROB_SUM_TOL = 1e-3
MASK_SOURCES = ("segmentation_head", "saliency:gradcam", "saliency:gradcampp", "saliency:scorecam")
SALIENCY_METHODS = ("gradcam", "gradcampp", "scorecam")

# keys that would carry who the patient is (checked case-insensitively, after removing _ - and spaces)
_IDENTIFIER_KEYS = re.compile(
    r"(name|patientid|^id$|mrn|medicalrecord|birth|dob|ssn|socialsecurity|address|phone|email|"
    r"accession|insurance|studyinstanceuid|patientuid)"
)
# text that looks like an identifier written into free text: "MRN: 123", "DOB 1970-01-01", "name: ..."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputInfo(_Strict):
    """What was explained: file basename only (a path could name the patient's folder)."""

    file: str = Field(min_length=1)
    modality: str = "MR"
    # where ``modality`` came from: the file (DICOM's tag, a server-stamped NIfTI), "assumed" (a picture, NIfTI or
    # NRRD records none: MR is a guess), or "intensities" (CT's Hounsfield units); None in records before 1.5
    modality_from: Literal["file", "assumed", "intensities"] | None = None
    kind: Literal["image2d", "volume"]
    dims: list[int] = Field(min_length=2, max_length=3)
    spacing_mm: list[float] = Field(min_length=2, max_length=3)
    spacing_known: bool = True

    @field_validator("file")
    @classmethod
    def _basename(cls, v: str) -> str:
        if "/" in v or "\\" in v:
            raise ValueError(f"file must be a basename, not a path: {v!r}")
        return v

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError(f"dims must be positive, got {v}")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(s) or s <= 0 for s in v):
            raise ValueError(f"spacing must be positive and finite, got {v}")
        return v

    @model_validator(mode="after")
    def _same_rank(self) -> InputInfo:
        if len(self.dims) != len(self.spacing_mm):
            raise ValueError(f"dims {self.dims} and spacing_mm {self.spacing_mm} differ in length")
        return self


class Uncertainty(_Strict):
    entropy: float = Field(ge=0.0)
    method: str
    std: dict[str, float] | None = None

    @field_validator("std")
    @classmethod
    def _known_std(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            unknown = set(v) - set(CLASS_NAMES)
            if unknown:
                raise ValueError(f"std names unknown classes {sorted(unknown)}")
            if any(not math.isfinite(s) or s < 0 for s in v.values()):
                raise ValueError("std values must be finite and >= 0")
        return v


class FamiliarityInfo(_Strict):
    """k-NN cosine similarity of the image's features to the training images' (``tumorlens.alignment.familiarity``)
    and, when the model carries layer statistics, the layer score (the largest of the encoder stages' Mahalanobis
    distances to the training images', in units of a validation image's median; ``layer_statistics``).
    ``familiar`` is false below the k-NN threshold or above the layer threshold, each the one that 99 % of
    grouped-validation images meet."""

    score: float = Field(ge=-1.0, le=1.0)
    threshold: float = Field(ge=-1.0, le=1.0)
    k: int = Field(ge=1)
    familiar: bool
    layer_score: float | None = Field(default=None, ge=0.0)
    layer_threshold: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> FamiliarityInfo:
        if (self.layer_score is None) != (self.layer_threshold is None):
            raise ValueError("layer_score and layer_threshold come together")
        layers_ok = self.layer_score is None or self.layer_score <= self.layer_threshold
        if self.familiar != (self.score >= self.threshold and layers_ok):
            raise ValueError(f"familiar={self.familiar} contradicts score {self.score} vs threshold {self.threshold}"
                             + ("" if self.layer_score is None else
                                f" and layer score {self.layer_score} vs threshold {self.layer_threshold}"))
        return self


def _probabilities_over(v: dict[str, float], names: tuple[str, ...], what: str, kind: str) -> dict[str, float]:
    """``v`` when it gives each of ``names`` a probability in [0, 1]; else a ValueError saying so."""
    if set(v) != set(names):
        raise ValueError(f"{what} must have exactly the {kind} {list(names)}, got {sorted(v)}")
    if any(not math.isfinite(p) or p < 0.0 or p > 1.0 for p in v.values()):
        raise ValueError(f"{what} must lie in [0, 1]")
    return v


class WindowOpinion(_Strict):
    """The lesion-window classifier's tumour-type probabilities (``tumorlens.models.window``), fused with the
    whole-slice network's (``network_probabilities``) into ``Classification.probabilities`` by the fusion
    fitted on the model's validation part (``weight``, ``sharpness``); ``changed_label`` says the fusion
    named another tumour type than the network alone."""

    probabilities: dict[str, float]
    network_probabilities: dict[str, float]
    weight: float = Field(ge=0.0, le=1.0)  # the window's share in the geometric mean
    sharpness: float = Field(default=1.0, gt=0.0)  # the fused types' inverse temperature
    changed_label: bool

    @field_validator("probabilities")
    @classmethod
    def _tumour_types(cls, v: dict[str, float]) -> dict[str, float]:
        return _probabilities_over(v, TUMOUR_CLASSES, "window probabilities", "tumour types")

    @field_validator("network_probabilities")
    @classmethod
    def _classes(cls, v: dict[str, float]) -> dict[str, float]:
        return _probabilities_over(v, CLASS_NAMES, "network probabilities", "classes")

    @property
    def network_label(self) -> str:
        return max(self.network_probabilities, key=self.network_probabilities.get)


class Classification(_Strict):
    label: str
    probabilities: dict[str, float]
    uncertainty: Uncertainty
    familiarity: FamiliarityInfo | None = None
    window_opinion: WindowOpinion | None = None

    @field_validator("label")
    @classmethod
    def _known_label(cls, v: str) -> str:
        if v not in CLASS_NAMES:
            raise ValueError(f"unknown label {v!r}; expected one of {', '.join(CLASS_NAMES)}")
        return v

    @field_validator("probabilities")
    @classmethod
    def _proper_distribution(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(CLASS_NAMES):
            raise ValueError(f"probabilities must have exactly the classes {list(CLASS_NAMES)}, got {sorted(v)}")
        for k, p in v.items():
            if not math.isfinite(p) or p < 0.0 or p > 1.0:
                raise ValueError(f"probability of {k!r} is {p}, outside [0, 1]")
        total = sum(v.values())
        if abs(total - 1.0) > PROB_SUM_TOL:
            raise ValueError(f"probabilities sum to {total:.4f}, not 1")
        return {k: v[k] for k in CLASS_NAMES}  # the one class order, everywhere

    @model_validator(mode="after")
    def _label_is_top(self) -> Classification:
        top = max(self.probabilities.values())
        if self.probabilities[self.label] < top - 1e-6:
            raise ValueError(f"label {self.label!r} is not the most probable class")
        return self


class BBox(_Strict):
    min: list[int] = Field(min_length=2, max_length=3)
    max: list[int] = Field(min_length=2, max_length=3)

    @model_validator(mode="after")
    def _ordered(self) -> BBox:
        if len(self.min) != len(self.max) or any(a > b or a < 0 for a, b in zip(self.min, self.max, strict=True)):
            raise ValueError(f"bad bounding box min={self.min} max={self.max}")
        return self


class MaskInfo(_Strict):
    source: Literal["segmentation_head", "saliency:gradcam", "saliency:gradcampp", "saliency:scorecam"]
    empty: bool
    voxels: int = Field(ge=0)
    area_mm2: float | None = Field(default=None, ge=0.0)
    volume_mm3: float | None = Field(default=None, ge=0.0)
    bbox: BBox | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MaskInfo:
        if self.empty != (self.voxels == 0):
            raise ValueError(f"empty={self.empty} but voxels={self.voxels}")
        if self.empty and self.bbox is not None:
            raise ValueError("an empty mask has no bounding box")
        if not self.empty and self.bbox is None:
            raise ValueError("a non-empty mask needs a bounding box")
        return self


class SaliencyInfo(_Strict):
    method: Literal["gradcam", "gradcampp", "scorecam"]
    percentile: float = Field(ge=0.0, le=100.0)
    threshold: float
    rule: str
    # share of the segmentation head's outline that lies in the salient area (None: either is empty, or a record
    # before 1.6): the regions are the salient area's, and a reader must know when it missed the outlined lesion
    outline_inside_fraction: float | None = Field(default=None, ge=0.0, le=1.0)


class Region(_Strict):
    label: str = Field(min_length=1)  # the atlas's own label, e.g. "Left_Insular_Cortex"
    name: str = Field(min_length=1)  # readable, e.g. "insular cortex"
    hemisphere: Literal["left", "right", "midline", "unknown"]
    fraction: float = Field(ge=0.0, le=1.0)
    max_probability: float = Field(ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _an_atlas_region(self) -> Region:
        """A region is one of the atlas's own, with the name and side its label gives: the report
        and the viewer name what the record says, so a record may not invent or relabel a region."""
        from tumorlens.atlas.harvard_oxford import (
            UNLABELLED,
            AtlasNotFoundError,
            hemisphere_of,
            labels,
            readable_name,
        )

        try:
            known = labels()
        except AtlasNotFoundError:  # without the atlas files the label set cannot be checked
            known = None
        if known is not None and self.label != UNLABELLED and self.label not in known:
            raise ValueError(f"region {self.label!r} is not a Harvard-Oxford atlas label")
        if self.name != readable_name(self.label):
            raise ValueError(f"region {self.label!r} is named {self.name!r}, not {readable_name(self.label)!r}")
        side = hemisphere_of(self.label)
        if side in ("left", "right") and self.hemisphere not in (side, "unknown"):
            raise ValueError(f"region {self.label!r} lies in the {side} hemisphere, not {self.hemisphere!r}")
        return self


class Lesion(_Strict):
    centroid_mni_mm: list[float] | None = Field(default=None, min_length=3, max_length=3)
    laterality: Literal["left", "right", "bilateral", "midline", "unknown"] = "unknown"
    crosses_midline: bool | None = None
    mask_source: str = "none"


class Placement(_Strict):
    method: Literal["mni_registration", "template_slice", "none"] = "none"
    quality: float | None = None
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    low_confidence: bool = False
    details: dict[str, Any] = Field(default_factory=dict)


def _identifier_key(key: str) -> bool:
    return bool(_IDENTIFIER_KEYS.search(re.sub(r"[\s_\-]", "", key.lower())))


class Patient(_Strict):
    """Clinical context only; never who the patient is (names, IDs, dates of birth are refused)."""

    # strict: an age of ``true`` was stored as 1, and "45" as 45 without a word
    age: int | None = Field(default=None, ge=0, le=130, strict=True)
    sex: Literal["F", "M", "O"] | None = None
    clinical_history: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="before")
    @classmethod
    def _no_identifier_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = [k for k in data if isinstance(k, str) and _identifier_key(k)]
            if bad:
                raise ValueError(f"patient identifiers are not allowed in findings: {bad}")
        return data

    @field_validator("clinical_history")
    @classmethod
    def _no_identifier_text(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # an empty history is no history
        if any(unicodedata.category(c) in ("Cc", "Cf") and c not in "\n\t" for c in v):
            raise ValueError("clinical_history holds control or invisible characters (NUL, escape sequences, "
                             "zero-width spaces); send plain text")
        greek_words = re.findall(r"[\u0370-\u03ff\u1f00-\u1fff]{2,}", v)  # a lone Greek letter is notation (β-hCG)
        if greek_words or any(unicodedata.category(c).startswith("L") and not _latin(c) for c in v):
            # names in other scripts cannot be told from words here ("患者 王小明", "пациент Иван Петров"): a
            # refused history can be rewritten, a name that got through cannot be taken back
            raise ValueError("clinical_history holds letters of a script other than Latin, in which names cannot be "
                             "checked for; write it in English (the report's language) or leave it out")
        found = find_identifiers(v)
        if found:
            raise ValueError(f"clinical_history looks like it contains identifiers ({', '.join(found)}); remove them")
        names = capitalised_names(v)
        if names:
            raise ValueError(f"clinical_history has capitalised words inside a sentence that may be a name "
                             f"({', '.join(names[:3])}); write the history in lower case without names")
        return v


def check_patient(data: Any, source: str | Path | None = None) -> dict:
    """Patient context (age, sex, clinical_history) checked before any work: an ``InvalidInputError`` naming the
    fields and never quoting a value (a value refused as an identifier is one); the command line and the server
    both ask here."""
    try:
        return Patient.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as e:
        raise InvalidInputError(source, _short(e, limit=3)) from e


def _latin(c: str) -> bool:
    """Latin letters, and the Greek ones of medical usage (β-hCG, µm)."""
    return unicodedata.name(c, "").startswith(("LATIN", "GREEK", "MICRO SIGN"))


class TextMatch(_Strict):
    class_name: str
    description: str
    similarity: float = Field(ge=-1.0, le=1.0)

    @field_validator("description")
    @classmethod
    def _no_identifiers(cls, v: str) -> str:
        """A class description is text about a class: a name, date or record number in it is refused (the
        report quotes the descriptions)."""
        from tumorlens.findings.identifiers import PERSONAL, find_identifiers

        kinds = [k for k in find_identifiers(v) if k in PERSONAL]
        if kinds:
            raise ValueError(f"text match description holds what looks like a patient identifier ({', '.join(kinds)})")
        return v


class Provenance(_Strict):
    model: str
    model_version: str
    config_hash: str
    tumorlens_version: str
    created_at: str  # ISO 8601, UTC
    code_commit: str | None = None  # the checkout's git commit, "-dirty" with uncommitted edits (schema 1.4)

    @field_validator("created_at")
    @classmethod
    def _iso(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as e:
            raise ValueError(f"created_at is not ISO 8601: {v!r}") from e
        return v


MIDLINE_SLACK_MM = 10.0  # a one-sided lesion's centroid may lie this far across the midline (MNI x)


def _agrees(stated: float, computed: float, what: str, how: str) -> None:
    if abs(stated - computed) > 0.01 * computed + 0.01:
        raise ValueError(f"{what} is {stated:g} but {how} give {computed:g}")


class Findings(_Strict):
    """The whole record (``SCHEMA_VERSION``); see the module docstring for what it refuses."""

    schema_version: str = SCHEMA_VERSION
    input: InputInfo
    classification: Classification
    masks: list[MaskInfo] = Field(default_factory=list)
    saliency: SaliencyInfo | None = None
    regions: list[Region] = Field(default_factory=list)
    lesion: Lesion = Field(default_factory=Lesion)
    placement: Placement = Field(default_factory=Placement)
    notes: list[str] = Field(default_factory=list)
    patient: Patient | None = None
    text_matches: list[TextMatch] = Field(default_factory=list)
    provenance: Provenance

    @field_validator("schema_version")
    @classmethod
    def _compatible(cls, v: str) -> str:
        if v.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(f"schema_version {v!r} is not compatible with {SCHEMA_VERSION!r}")
        return v

    @model_validator(mode="after")
    def _fits_its_input(self) -> Findings:
        """Masks inside the image they were made on, an entropy a 4-class softmax can have: a hand-edited
        record had produced "1,000,000,000 cm3" and "entropy 50 of at most 1.39" in a verified report."""
        most = math.log(len(self.classification.probabilities))
        if self.classification.uncertainty.entropy > most + 1e-6:
            raise ValueError(f"entropy {self.classification.uncertainty.entropy:g} exceeds ln({len(self.classification.probabilities)}) = {most:.3f}")
        unc = self.classification.uncertainty
        if unc.method == "softmax_entropy":  # the probabilities' own entropy: "low uncertainty" at p 0.55 / 0.37
            h = -sum(p * math.log(p) for p in self.classification.probabilities.values() if p > 0)
            if abs(unc.entropy - h) > 0.02:
                raise ValueError(f"uncertainty.entropy {unc.entropy:g} is not the entropy of the probabilities "
                                 f"({h:.3f})")
        dims = list(self.input.dims)
        n = math.prod(dims)
        for m in self.masks:
            if m.voxels > n:
                raise ValueError(f"mask {m.source} has {m.voxels} voxels; the image has {n}")
            if m.bbox is not None and (len(m.bbox.max) != len(dims) or any(b >= d for b, d in zip(m.bbox.max, dims, strict=True))):
                raise ValueError(f"mask {m.source} bounding box {m.bbox.min}-{m.bbox.max} lies outside the image {dims}")
        return self

    @model_validator(mode="after")
    def _numbers_agree(self) -> Findings:
        """What one field says another must agree with (a hand-edited record with a volume ten times its voxels,
        a lesion on the left centred 40 mm right of the midline, or a lesion outlined by a mask the record does
        not hold was reported as verified)."""
        sources = {m.source for m in self.masks}
        src = self.lesion.mask_source
        if (src == "segmentation_head" or src.startswith("saliency:")) and src not in sources:
            raise ValueError(f"lesion.mask_source {src!r} names no mask of the record ({', '.join(sorted(sources)) or 'none'})")
        if self.saliency is not None and any(s.startswith("saliency:") for s in sources) \
                and f"saliency:{self.saliency.method}" not in sources:
            raise ValueError(f"saliency.method {self.saliency.method!r} has no mask in the record")
        sp = self.input.spacing_mm
        if self.input.spacing_known:
            for m in self.masks:
                if m.volume_mm3 is not None and len(sp) == 3:
                    _agrees(m.volume_mm3, m.voxels * math.prod(sp), f"mask {m.source} volume_mm3", "voxels x voxel volume")
                if m.area_mm2 is not None and len(sp) == 2:
                    _agrees(m.area_mm2, m.voxels * sp[0] * sp[1], f"mask {m.source} area_mm2", "pixels x pixel area")
        c, side = self.lesion.centroid_mni_mm, self.lesion.laterality
        if c is not None and side in ("left", "right") and (c[0] > MIDLINE_SLACK_MM if side == "left"
                                                             else c[0] < -MIDLINE_SLACK_MM):
            raise ValueError(f"lesion laterality is {side!r} but its centroid lies at x = {c[0]:+.1f} mm in MNI space "
                             f"({'right' if c[0] > 0 else 'left'} of the midline)")
        return self

    @model_validator(mode="after")
    def _regions_consistent(self) -> Findings:
        fr = [r.fraction for r in self.regions]
        if any(a < b - 1e-9 for a, b in zip(fr, fr[1:], strict=False)):
            raise ValueError("regions must be sorted by fraction, largest first")
        if sum(fr) > 1.0 + 1e-3:
            raise ValueError(f"region fractions sum to {sum(fr):.3f} > 1")
        side = self.lesion.laterality
        if side in ("left", "right"):  # a one-sided lesion has < 5 % of itself on the other side
            other = "right" if side == "left" else "left"
            share = sum(r.fraction for r in self.regions if r.hemisphere == other)
            if share > 0.5:
                raise ValueError(f"lesion laterality is {side!r} but {share:.0%} of it lies in {other} regions")
        sides = {r.hemisphere for r in self.regions}
        if self.lesion.crosses_midline and len(sides) == 1 and sides <= {"left", "right"}:
            # "crosses the midline" for a lesion 59 mm left, every region a Left_ one (a hand-edited record)
            raise ValueError(f"lesion crosses_midline is true but every region lies in the {next(iter(sides))} hemisphere")
        if side in ("left", "right") and any("does not show which hemisphere" in n for n in self.notes):
            raise ValueError(f"lesion laterality is {side!r} on a sagittal slice, whose side cannot be known (see notes)")
        if self.placement.low_confidence:
            if self.regions:
                raise ValueError("placement is low-confidence: regions must be empty")
            if not self.notes:
                raise ValueError("placement is low-confidence: a note must say why")
        return self

    # ---- files -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Findings:
        """Read and validate a findings.json; any problem is an ``InvalidInputError`` naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise InvalidInputError(path, "findings file does not exist") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidInputError(path, f"not a readable JSON findings record: {e}") from e
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> Findings:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InvalidInputError(source, f"invalid findings record: {_short(e)}") from e

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, then rename): readers never see half a file."""
        return atomic_write_text(path, self.to_json() + "\n")


def _short(e: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def json_schema() -> dict:
    """The JSON Schema of :class:`Findings`, with the version in its ``$id``-like title."""
    schema = Findings.model_json_schema()
    schema["title"] = f"tumorlens findings {SCHEMA_VERSION}"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


SCHEMA_FILE = Path(__file__).with_name("findings.schema.json")


def write_json_schema(path: str | Path = SCHEMA_FILE) -> Path:
    """Regenerate ``findings.schema.json`` (``python -m tumorlens.findings.schema``)."""
    path = Path(path)
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    print(write_json_schema())
