"""Paired comparisons of networks in Table 9: each LR-Net against each ResNet (every pair of
networks when one family is absent), per cell.

* The comparison (``pair_table``): the difference of the mean accuracies over seeds (A - B,
  percentage points), its 95% interval and p-value from the two-level bootstrap of
  ``robustlr.eval.stats.paired_difference_bootstrap`` (seeds drawn per network, the images
  drawn once for both: same images, same targets), and one sentence saying what is resolved.
* McNemar's exact test per training seed (``seed_pair_table``): seed s of A against seed s of
  B on the same images and targets.

Two cells are paired when both networks were evaluated on the same images (same
``subset_sha256``) and, for targeted attacks, the same targets (same ``targets_sha256``), and
every row has an outcomes file that belongs to it (``robustlr.eval.runner.verify_outcomes``).
Otherwise the pair is listed with an empty p-value and the reason (one line).
"""

from __future__ import annotations

import itertools
import logging

import pandas as pd

from robustlr.eval.stats import CONFIDENCE, mcnemar, paired_difference_bootstrap
from robustlr.report.results import row_outcomes
from robustlr.report.table9 import CELLS, CellStats, Table9, network_order

log = logging.getLogger(__name__)

PAIR_COLUMNS = (
    "cell",
    "network_a",
    "network_b",
    "accuracy_a",
    "accuracy_b",
    "difference",
    "difference_low",
    "difference_high",
    "p_value",
    "seeds_a",
    "seeds_b",
    "n",
    "verdict",
    "sentence",
    "note",
)
SEED_PAIR_COLUMNS = (
    "cell",
    "network_a",
    "network_b",
    "train_seed",
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
ALPHA = 1 - CONFIDENCE
NO_DIFFERENCE = "no difference detected"
FAMILIES = ("resnet", "lrnet")  # compared across: A an LR-Net, B a ResNet


def comparisons(networks: list[str]) -> list[tuple[str, str]]:
    """(A, B) pairs to compare: every LR-Net against every ResNet when both families are
    there, else every pair (in table order)."""
    family = {n: network_order(n)[0] for n in networks}
    lrnets = [n for n in networks if family[n] == FAMILIES.index("lrnet")]
    resnets = [n for n in networks if family[n] == FAMILIES.index("resnet")]
    if lrnets and resnets:
        return [(a, b) for a in lrnets for b in resnets]
    return list(itertools.combinations(networks, 2))


def verdict(network_a: str, low: float, high: float) -> str:
    """What a difference interval resolves: ``A higher``, ``A lower`` or no difference."""
    if low > 0:
        return f"{network_a} higher"
    if high < 0:
        return f"{network_a} lower"
    return NO_DIFFERENCE


def sentence(cell: str, a: str, b: str, out: dict[str, object]) -> str:
    """One line per comparison, e.g. ``adv_targeted, lrnet26 - resnet26: no difference
    detected: +0.8 [-4.1, +5.6] points (p = 0.74; 3 vs 3 seeds, 359 images)``."""
    head = f"{cell}, {a} - {b}"
    if out["p_value"] is None:
        return f"{head}: not tested ({out['note']})"
    return (
        f"{head}: {out['verdict']}: {out['difference']:+.1f} "
        f"[{out['difference_low']:+.1f}, {out['difference_high']:+.1f}] points "
        f"(p = {out['p_value']:.2g}; {out['seeds_a']} vs {out['seeds_b']} seeds, "
        f"{out['n']} images)"
    )


def not_paired_reason(a: CellStats, b: CellStats) -> str:
    """Why two cells cannot be compared image by image ("" when they can)."""
    row_a, row_b = next(iter(a.rows.values())), next(iter(b.rows.values()))
    if not row_a["subset_sha256"] or row_a["subset_sha256"] != row_b["subset_sha256"]:
        return "not paired: evaluated on different (or unrecorded) image subsets"
    if row_a["targets_sha256"] != row_b["targets_sha256"]:
        return "not paired: attacked toward different targets"
    for cell in (a, b):
        if cell.outcomes is None:
            whys = [row_outcomes(r)[1] for r in cell.rows.values()]
            why = next((w for w in whys if w), "its seeds are on different images or targets")
            return f"not paired: {why}"
    assert a.outcomes is not None and b.outcomes is not None
    if a.outcomes.shape[1] != b.outcomes.shape[1]:
        return "not paired: outcome files differ in length"
    return ""


def compare_cells(a: CellStats, b: CellStats, network_a: str) -> dict[str, object]:
    """The paired bootstrap comparison of two cells (A - B); p_value None with a note when
    they are not paired."""
    out: dict[str, object] = {
        "accuracy_a": round(a.mean, 1),
        "accuracy_b": round(b.mean, 1),
        "difference": round(a.mean - b.mean, 1),
        "difference_low": None,
        "difference_high": None,
        "p_value": None,
        "seeds_a": len(a.rows),
        "seeds_b": len(b.rows),
        "n": None,
        "verdict": "",
        "note": not_paired_reason(a, b),
    }
    if out["note"] or a.outcomes is None or b.outcomes is None:
        return out
    result = paired_difference_bootstrap(a.outcomes, b.outcomes)
    out.update(
        difference=round(result.estimate, 1),
        difference_low=round(result.low, 1),
        difference_high=round(result.high, 1),
        p_value=result.p_value,
        n=result.n,
        verdict=verdict(network_a, round(result.low, 1), round(result.high, 1)),
    )
    return out


def pair_table(table: Table9, cells: tuple[str, ...] = CELLS) -> pd.DataFrame:
    """One row per (cell, LR-Net, ResNet) with both cells filled: the mean accuracies, the
    difference with its interval and p-value, the verdict and its sentence."""
    rows = []
    for cell in cells:
        for a, b in comparisons(table.networks):
            if (a, cell) not in table.stats or (b, cell) not in table.stats:
                continue
            out = compare_cells(table.stats[(a, cell)], table.stats[(b, cell)], a)
            out["sentence"] = sentence(cell, a, b, out)
            rows.append({"cell": cell, "network_a": a, "network_b": b, **out})
    frame = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    log.info("%d paired comparison(s), %d tested", len(frame), int(frame["p_value"].notna().sum()))
    return frame


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


def seed_pair_table(table: Table9, cells: tuple[str, ...] = CELLS) -> pd.DataFrame:
    """McNemar per training seed: one row per (cell, A, B, seed) for the seeds both networks
    have (seed s of A against seed s of B, same images and targets)."""
    rows = []
    for cell in cells:
        for a, b in comparisons(table.networks):
            if (a, cell) not in table.stats or (b, cell) not in table.stats:
                continue
            rows_a, rows_b = table.stats[(a, cell)].rows, table.stats[(b, cell)].rows
            for seed in [s for s in rows_a if s in rows_b]:
                result = paired_test(rows_a[seed], rows_b[seed])
                rows.append(
                    {"cell": cell, "network_a": a, "network_b": b, "train_seed": seed, **result}
                )
    return pd.DataFrame(rows, columns=list(SEED_PAIR_COLUMNS))
