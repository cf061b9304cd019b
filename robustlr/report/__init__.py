"""Reports: the paper's Table 9 from evaluation results, paired tests, sanity checks, plots."""

from robustlr.report.checks import CheckResult, checks_frame, run_checks, worst_status
from robustlr.report.pairs import pair_table, paired_test
from robustlr.report.pipeline import Report, make_report
from robustlr.report.results import ResultsError, collect_results, read_results
from robustlr.report.table9 import (
    CELLS,
    COLUMNS,
    TABLE9_COLUMNS,
    ReportSettings,
    Table9,
    build_table9,
)
from robustlr.report.writers import rich_table_data, to_latex, to_markdown, write_report

__all__ = [
    "CELLS",
    "COLUMNS",
    "TABLE9_COLUMNS",
    "CheckResult",
    "Report",
    "ReportSettings",
    "ResultsError",
    "Table9",
    "build_table9",
    "checks_frame",
    "collect_results",
    "make_report",
    "pair_table",
    "paired_test",
    "read_results",
    "rich_table_data",
    "run_checks",
    "to_latex",
    "to_markdown",
    "worst_status",
    "write_report",
]
