"""Verified radiology-style reports from a findings record (langchain chain + verifier + template).

``generate_report(findings, backend=None)`` is the one entry point; see :mod:`.chain`.
"""

from tumorlens.report.chain import ReportResult, generate_report
from tumorlens.report.schema import DifferentialItem, RadiologyReport, ReportDraft

__all__ = ["DifferentialItem", "RadiologyReport", "ReportDraft", "ReportResult", "generate_report"]
