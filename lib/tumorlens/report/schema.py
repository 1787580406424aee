"""The report's structure: what the chat model writes (``ReportDraft``) and what is delivered
(``RadiologyReport``).

Why two models: a small local model writes fluent prose but invents facts. So the model only
writes the prose fields; the factual fields (regions, side, differential with the classifier's
probabilities, limitations) are copied from the findings record, and the verifier still checks
every sentence the model wrote against that record.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReportDraft(BaseModel):
    """The chat model's output (its JSON schema constrains the generation)."""

    # minimum lengths go into the JSON schema, so a grammar-constrained model cannot answer ""
    findings: str = Field(min_length=40, description="Two to four sentences describing the lesion, using only the FACTS.")
    impression: str = Field(min_length=20, description="One sentence: the most likely class and where, using only the FACTS.")
    recommendations: str = Field(min_length=10, description="One or two sentences of next steps; no new facts.")


class DifferentialItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    diagnosis: str = Field(description="one of the classifier's classes")
    probability: float = Field(ge=0.0, le=1.0, description="the classifier's probability, copied from the findings")


class RadiologyReport(BaseModel):
    """A structured, radiology-style report of one explained image."""

    model_config = ConfigDict(extra="forbid")

    technique: str
    findings: str
    impression: str
    regions: list[str] = Field(default_factory=list, description="atlas regions holding at least 1 % of the lesion, "
                                                                "largest share first, from the findings")
    regions_not_listed: int = Field(0, ge=0, description="regions of the findings holding under 1 % of the lesion "
                                                         "each, left out of `regions` (the findings list them all)")
    laterality: str = "unknown"
    # what `regions` and `laterality` describe: the lesion outline, or the saliency map's salient area (where the
    # classifier looked), which is the mask the regions come from when a saliency method made it
    regions_of: str = "lesion"
    differential: list[DifferentialItem] = Field(default_factory=list)
    recommendations: list[str] = Field(default_factory=list)
    limitations: list[str] = Field(default_factory=list)
    matched_descriptions: list[str] = Field(
        default_factory=list, description="the class descriptions the image matched in the model's text space, "
                                          "copied from the findings (nearest first)")

    def text_fields(self) -> dict[str, str]:
        """Every free-text part, by field name (what the verifier reads)."""
        out = {"technique": self.technique, "findings": self.findings, "impression": self.impression}
        for i, r in enumerate(self.recommendations):
            out[f"recommendations[{i}]"] = r
        for i, r in enumerate(self.limitations):
            out[f"limitations[{i}]"] = r
        return out
