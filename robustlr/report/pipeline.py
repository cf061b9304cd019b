"""The report workflow shared by ``robustlr report`` and ``robustlr run``: results -> Table 9,
paired tests, sanity checks, files and plots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from robustlr.report.checks import CheckResult, run_checks
from robustlr.report.curves import broken_by_table
from robustlr.report.pairs import pair_table, seed_pair_table
from robustlr.report.results import RUN_KEY, collect_results
from robustlr.report.table9 import ReportSettings, Table9, build_table9
from robustlr.report.writers import write_report
from robustlr.runs import CHECKPOINT_PREFERENCE


@dataclass
class Report:
    """What a report built and wrote (for the CLI to show)."""

    table: Table9
    pairs: pd.DataFrame
    checks: list[CheckResult]
    seed_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    written: list[Path] = field(default_factory=list)


def with_model_checks(
    checks: list[CheckResult], table: Table9, checkpoint_names: tuple[str, ...]
) -> list[CheckResult]:
    """``checks`` with the placeholders of the checks that need the models (eval-mode
    determinism, transfer) replaced by those checks run on the report's runs (a check whose
    model or data is missing says what is missing)."""
    from robustlr.report.live_checks import model_checks

    live = model_checks(table.runs, table.cells, table.networks, checkpoint_names)
    names = {c.check for c in live}
    return [c for c in checks if c.check not in names] + live


def make_report(
    settings: ReportSettings,
    out: Path,
    *,
    results: Sequence[Path] = (),
    runs_dir: Path | None = None,
    fmt: str = "csv",
    plots_dir: Path | None = None,
    checkpoint_names: tuple[str, ...] = CHECKPOINT_PREFERENCE,
) -> Report:
    """Build Table 9 from ``results`` (else every eval.csv under ``runs_dir``), its paired
    tests and sanity checks; write them to ``out`` (and beside it), and the plots to
    ``plots_dir`` (None: no plots), geometric priors from each run's first existing
    ``checkpoint_names``. Raises ``ResultsError`` when there are no usable results."""
    table = build_table9(collect_results(results, runs_dir), settings)
    pairs = pair_table(table)
    seed_pairs = seed_pair_table(table)
    checks = with_model_checks(run_checks(table.results, table), table, checkpoint_names)
    chosen = table.results[table.results[RUN_KEY].isin(set(table.runs.values()))]
    broken_by = broken_by_table(chosen, table.eps, table.settings.norm)
    written = write_report(table, out, fmt, pairs, checks, seed_pairs, broken_by)
    if plots_dir is not None:
        from robustlr.report.curves import plot_robustness_curves
        from robustlr.report.plots import report_plots, run_geo_prior_plots

        written += report_plots(chosen, plots_dir, table.eps)
        written += plot_robustness_curves(chosen, plots_dir)
        written += run_geo_prior_plots(table.runs, plots_dir, checkpoint_names)
    return Report(table, pairs, checks, seed_pairs, written)
