"""lmforge.report: one self-contained HTML page per run."""

from lmforge.report.html import write_report

__all__ = ["write_report"]
