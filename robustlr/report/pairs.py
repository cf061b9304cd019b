"""Paired comparisons of networks in Table 9: McNemar's exact test on per-example outcomes.

Two cells are paired when both networks were evaluated on the same images (same
``subset_sha256``) and, for targeted attacks, the same targets (same ``targets_sha256``), and
both rows have outcomes files that belong to them: every file records the threat key of the row
it was written for (images, checkpoint, full threat model; ``robustlr.eval.runner``) and is
refused for any other row. Otherwise the pair is listed with an empty p-value and the reason
(one line).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustlr.eval.runner import load_outcomes, verify_outcomes
from robustlr.eval.stats import mcnemar
from robustlr.report.results import OUTCOMES_PATH
from robustlr.report.table9 import CELLS, Table9

log = logging.getLogger(__name__)

PAIR_COLUMNS = (
    "cell",
    "network_a",
    "network_b",
    "accuracy_a",
    "accuracy_b",
    "difference",
    "only_a",
    "only_b",
    "n",
    "p_value",
    "significant",
    "note",
)
ALPHA = 0.05


def row_outcomes(row: pd.Series) -> tuple[np.ndarray | None, str]:
    """The per-example ``correct`` array of a result row from its outcomes file, or (None, why
    not) when there is none or it belongs to another row (``verify_outcomes``)."""
    data, why = row_outcome_data(row)
    return (None, why) if data is None else (np.asarray(data["correct"], dtype=bool), "")


def row_outcome_data(row: pd.Series) -> tuple[dict[str, Any] | None, str]:
    """A result row's outcomes file as read by ``load_outcomes`` (``correct``, ``norms``...),
    or (None, why not) when there is none or it belongs to another row."""
    path = str(row.get(OUTCOMES_PATH, "") or "")
    if not path:
        return None, f"run {row['run']} saved no outcomes file for {row['attack']}"
    if not Path(path).is_file():
        return None, f"outcomes file {path} is missing"
    try:
        data = load_outcomes(path)
    except (OSError, ValueError, KeyError) as exc:
        return None, f"outcomes file {path} is unreadable ({exc})"
    why = verify_outcomes(data, row, path)
    if why:
        log.warning("%s", why)
        return None, why
    return data, ""


def paired_test(row_a: pd.Series, row_b: pd.Series) -> dict[str, object]:
    """McNemar's test of two result rows; p_value None with a note when they are not paired."""
    out: dict[str, object] = {
        "accuracy_a": round(float(row_a["accuracy"]), 1),
        "accuracy_b": round(float(row_b["accuracy"]), 1),
        "difference": round(float(row_a["accuracy"]) - float(row_b["accuracy"]), 1),
        "only_a": None,
        "only_b": None,
        "n": None,
        "p_value": None,
        "significant": None,
        "note": "",
    }
    if not row_a["subset_sha256"] or row_a["subset_sha256"] != row_b["subset_sha256"]:
        out["note"] = "not paired: evaluated on different (or unrecorded) image subsets"
        return out
    if row_a["targets_sha256"] != row_b["targets_sha256"]:
        out["note"] = "not paired: attacked toward different targets"
        return out
    correct_a, why_a = row_outcomes(row_a)
    correct_b, why_b = row_outcomes(row_b)
    if correct_a is None or correct_b is None:
        out["note"] = f"not paired: {why_a or why_b}"
        return out
    if correct_a.shape != correct_b.shape:
        out["note"] = "not paired: outcome files differ in length"
        return out
    test = mcnemar(correct_a, correct_b)
    out.update(
        only_a=test.only_a,
        only_b=test.only_b,
        n=int(correct_a.size),
        p_value=test.p_value,
        significant=test.significant(ALPHA),
    )
    return out


def pair_table(table: Table9, cells: tuple[str, ...] = CELLS) -> pd.DataFrame:
    """One row per (cell, pair of networks) with both cells filled: accuracies, difference
    (a - b), discordant counts, McNemar p-value and whether it is below 0.05."""
    rows = []
    for cell in cells:
        for a, b in itertools.combinations(table.networks, 2):
            if (a, cell) not in table.cells or (b, cell) not in table.cells:
                continue
            result = paired_test(table.cells[(a, cell)], table.cells[(b, cell)])
            rows.append({"cell": cell, "network_a": a, "network_b": b, **result})
    frame = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    log.info("%d paired comparison(s), %d tested", len(frame), int(frame["p_value"].notna().sum()))
    return frame
