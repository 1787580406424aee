"""Pure-Python part of the TumorLens Slicer module: no ``slicer``, ``qt`` or ``vtk`` import here.

Everything that can be decided without a viewer (talking to the server, parsing its answers, naming
and colouring segments, formatting the report) lives here so it can be unit-tested anywhere.
"""

from .client import Cancelled, InferAnswer, MonaiLabelClient, ServerError, parse_infer_response
from .colors import color_distance, heat_table, region_color
from .files import PICTURE_EXTENSIONS, dicom_modality, is_dicom_file, is_picture_file, stamp_nifti_modality
from .report import ReportView, probabilities_table, report_markdown, report_view, verification_status
from .results import (
    CLASS_NAMES,
    ModelInfo,
    ResponseError,
    SegmentSpec,
    caveats_of,
    familiarity_of,
    familiarity_warning,
    findings_of,
    label_names_of,
    matched_descriptions,
    parse_label_map,
    parse_models,
    parse_strategies,
    probabilities_of,
    readable_region,
    segment_name,
    segment_specs,
    window_opinion_line,
)

# Python packages the module needs inside Slicer beyond what Slicer ships (numpy, vtk).
# TumorLensLib itself uses the standard library only, so this is empty; the module still checks it
# on first use and installs what is missing with slicer.util.pip_install.
REQUIREMENTS: dict[str, str] = {}

__all__ = [
    "CLASS_NAMES", "Cancelled", "InferAnswer", "ModelInfo", "MonaiLabelClient", "REQUIREMENTS", "ReportView",
    "ResponseError", "SegmentSpec", "ServerError", "caveats_of", "color_distance", "familiarity_of", "familiarity_warning",
    "dicom_modality", "findings_of", "heat_table", "is_dicom_file", "stamp_nifti_modality", "is_picture_file", "PICTURE_EXTENSIONS",
    "label_names_of", "matched_descriptions", "parse_infer_response", "parse_label_map", "parse_models", "parse_strategies",
    "probabilities_of", "probabilities_table", "readable_region", "region_color", "report_markdown",
    "report_view", "segment_name", "segment_specs", "verification_status", "window_opinion_line",
]
