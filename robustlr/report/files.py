"""The report's files in its directory, declared once: table9.csv (+ its .md twin, or .tex),
checks, pairs, per-seed values and plots. Kept free of heavy imports (pandas, scipy,
matplotlib), so that a study's stage processes, which only need these names, stay light."""

from __future__ import annotations

from pathlib import Path

FORMATS = ("csv", "md", "latex")
SUFFIXES = {"csv": ".csv", "md": ".md", "latex": ".tex"}
# the report's files in its directory: table9.csv (+ .md twin, or .tex), checks, pairs, plots
REPORT_STEM = "table9"
CHECKS_CSV = "checks.csv"
PAIRS_CSV = "pairs.csv"  # LR-Net vs ResNet per cell: difference over seeds, interval, p-value
SEED_PAIRS_CSV = "pairs_seeds.csv"  # McNemar per training seed
SEEDS_CSV = "table9_seeds.csv"  # every seed's value behind every cell
BROKEN_BY_CSV = "broken_by.csv"  # per run at Table 9's eps: images each attack broke (first, only)
PLOTS_DIR = "plots"


def report_file(directory: str | Path, fmt: str = "csv") -> Path:
    """Where a report of format ``fmt`` lives in ``directory`` (``table9.csv`` for csv)."""
    return Path(directory) / f"{REPORT_STEM}{SUFFIXES[fmt]}"
