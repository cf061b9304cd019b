"""metrics.csv: one row per epoch, rewritten consistently when a run resumes."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

BASE_COLUMNS = ("epoch", "lr", "loss", "train_acc", "val_acc", "images_per_s", "seconds", "images")


class MetricsCSV:
    """Append epoch rows to ``path``; on resume, drop rows past the checkpoint's epoch."""

    def __init__(self, path: str | Path, columns: Sequence[str], keep_epochs: int = 0) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        rows: list[dict[str, str]] = []
        if keep_epochs > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: Mapping[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v: float) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)
