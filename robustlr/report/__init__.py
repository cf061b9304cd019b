"""Reports: the paper's Table 9 from evaluation results, paired tests, sanity checks, plots.

The names below load on first use (PEP 562): importing ``robustlr.report.files`` (the report's
file names, needed by every study stage) then costs no pandas, scipy or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CELLS": "table9",
    "COLUMNS": "table9",
    "CheckResult": "checks",
    "Report": "pipeline",
    "ReportSettings": "table9",
    "ResultsError": "results",
    "TABLE9_COLUMNS": "table9",
    "Table9": "table9",
    "build_table9": "table9",
    "checks_frame": "checks",
    "collect_results": "results",
    "make_report": "pipeline",
    "pair_table": "pairs",
    "paired_test": "pairs",
    "read_results": "results",
    "rich_table_data": "writers",
    "run_checks": "checks",
    "to_latex": "writers",
    "to_markdown": "writers",
    "worst_status": "checks",
    "write_report": "writers",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
