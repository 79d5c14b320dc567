"""Reports from a sweep's results table: figures (matplotlib) and a Markdown report."""

from dipstream.reports.report import ReportConfig, make_report

__all__ = ["ReportConfig", "make_report"]
