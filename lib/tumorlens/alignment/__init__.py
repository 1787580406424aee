"""Text-anchored classification (TumorCLIP-style): frozen MiniLM prototypes of radiological class
descriptions, a projection into that text space, a Tip-Adapter cache and a fusion in which the text
decides; the semantic margin rate, prompt ablation and negation retrieval that show it does."""

from tumorlens.alignment.api import (
    aligned_probabilities,
    load_alignment,
    load_probe,
    nearest_descriptions,
    semantic_margin_for_folder,
    semantic_margin_rate,
    text_head,
)
from tumorlens.alignment.head import AlignedHead, build_head
from tumorlens.alignment.margin import margin_rate, semantic_margins
from tumorlens.alignment.projection import TextProjection, alignment_loss, fit_linear_probe, fit_projection
from tumorlens.alignment.prompts import ablate, load_descriptions
from tumorlens.alignment.text import build_prototypes, encode_texts
from tumorlens.alignment.tip_adapter import TipAdapter

__all__ = [
    "AlignedHead",
    "TextProjection",
    "TipAdapter",
    "ablate",
    "aligned_probabilities",
    "alignment_loss",
    "build_head",
    "build_prototypes",
    "encode_texts",
    "fit_linear_probe",
    "fit_projection",
    "load_alignment",
    "load_descriptions",
    "load_probe",
    "margin_rate",
    "nearest_descriptions",
    "semantic_margin_for_folder",
    "semantic_margin_rate",
    "semantic_margins",
    "text_head",
]
