"""Sanity checks computed from evaluation results (DESIGN.md §5): evidence that the attacks
worked. Each check gives pass / warn / fail (or skip, with the reason), its numbers and a
one-line explanation.

Thresholds: "near 0" is <= 5% (warn up to 20%); a rise in accuracy is a failure when it leaves
the Wilson 95% interval of the weaker setting and a warning when it stays inside; zero-gradient
fractions pass up to 1% and warn up to 10%.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from robustlr.eval.runner import load_outcomes
from robustlr.eval.stats import mcnemar
from robustlr.report.results import OUTCOMES_PATH, RUN_KEY, eps_matches
from robustlr.report.table9 import Table9, eps_text

log = logging.getLogger(__name__)

STATUSES = ("pass", "warn", "fail", "skip")
CHECK_COLUMNS = ("check", "status", "subject", "numbers", "message")
NEAR_ZERO = 5.0
NEAR_ZERO_WARN = 20.0
EPS_SWEEP_END = 10.0
ZERO_GRAD_PASS = 0.01
ZERO_GRAD_WARN = 0.10
SQUARE_EXTRA_SHARE = 0.01
PGD = ("pgd", "pgd-targeted", "pgd-untargeted", "pgd-least-likely")


@dataclass(frozen=True)
class CheckResult:
    """One sanity check on one subject (a run, a network, or "all")."""

    check: str
    status: str
    subject: str
    numbers: str
    message: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def checks_frame(checks: Iterable[CheckResult]) -> pd.DataFrame:
    """Checks as a DataFrame with ``CHECK_COLUMNS`` (the rows of ``checks.csv``)."""
    return pd.DataFrame([asdict(c) for c in checks], columns=list(CHECK_COLUMNS))


def worst_status(statuses: Iterable[str]) -> str:
    """fail > warn > pass > skip."""
    rank = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
    return max(statuses, key=rank.__getitem__, default="skip")


def _pct(value: float) -> str:
    return f"{value:.1f}%"


def _key(value: object) -> object:
    return round(float(value), 9) if isinstance(value, float) else value


def _trend(points: pd.DataFrame, x: str) -> tuple[str, str]:
    """Status of accuracy along increasing ``x`` (the strongest row per x) and the numbers:
    fail if it rises above the interval of a weaker setting, warn if it rises inside it."""
    best = points.sort_values("accuracy").groupby(x, sort=True).head(1).sort_values(x)
    status = "pass"
    for i in range(1, len(best)):
        before = best.iloc[:i]
        here = float(best["accuracy"].iloc[i])
        if here > float(before["accuracy_high"].min()):
            status = "fail"
        elif here > float(before["accuracy"].min()) and status == "pass":
            status = "warn"
    label = (lambda v: eps_text(v)) if x == "eps" else (lambda v: str(int(v)))
    numbers = ", ".join(
        f"{label(v)}: {_pct(a)}" for v, a in zip(best[x], best["accuracy"], strict=True)
    )
    return status, numbers


def check_monotone(results: pd.DataFrame, along: str) -> list[CheckResult]:
    """More ``along`` ("steps" or "restarts") never raises PGD accuracy, with everything else
    (run, attack, eps, target policy, precision, images, the other of steps/restarts) fixed."""
    name = f"more_{along}"
    other = "restarts" if along == "steps" else "steps"
    rows = results[results["attack"].isin(PGD)].copy()
    rows["eps_key"] = rows["eps"].round(9)
    keys = [RUN_KEY, "attack", "norm", "eps_key", "target_policy", "precision", "subset_sha256"]
    keys.append(other)
    out = []
    for _, group in rows.groupby(keys, sort=True, dropna=False):
        if group[along].nunique() < 2:
            continue
        status, numbers = _trend(group, along)
        first = group.iloc[0]
        subject = (
            f"{first['run']} {first['attack']} eps {eps_text(first['eps'])} "
            f"{first['precision']} n={int(first['n'])}"
        )
        message = {
            "pass": f"accuracy does not rise with more {along}",
            "warn": f"accuracy rises slightly with more {along} (inside the interval: noise?)",
            "fail": f"accuracy rises with more {along} beyond the interval: the attack is not "
            "converging (step size, gradient masking?)",
        }[status]
        out.append(CheckResult(name, status, subject, numbers, message))
    if not out:
        out.append(
            CheckResult(
                name,
                "skip",
                "all",
                "",
                f"no PGD rows differing only in {along} "
                + (
                    "(`robustlr check` runs a step sweep)"
                    if along == "steps"
                    else "(see the strong suite)"
                ),
            )
        )
    return out


def check_eps_sweep(results: pd.DataFrame) -> list[CheckResult]:
    """Accuracy falls with eps (clean accuracy counts as eps 0) and ends near 0."""
    rows = results[results["attack"].isin(PGD) & (results["eps"] > 0)]
    clean = results[results["attack"] == "clean"]
    keys = [RUN_KEY, "attack", "norm", "target_policy", "steps", "restarts", "precision"]
    keys.append("subset_sha256")
    out = []
    for _, group in rows.groupby(keys, sort=True, dropna=False):
        if group["eps"].round(9).nunique() < 2:
            continue
        first = group.iloc[0]
        same = clean[
            (clean[RUN_KEY] == first[RUN_KEY]) & (clean["subset_sha256"] == first["subset_sha256"])
        ]
        points = pd.concat([same.assign(eps=0.0), group]) if len(same) else group
        status, numbers = _trend(points, "eps")
        last = float(
            points[eps_matches(points["eps"], float(points["eps"].max()))]["accuracy"].min()
        )
        if status == "pass" and last > EPS_SWEEP_END:
            status = "warn"
            message = (
                f"accuracy falls with eps but is still {_pct(last)} at the largest eps: "
                "extend the sweep, or suspect gradient masking"
            )
        else:
            message = {
                "pass": "accuracy falls towards 0 as eps grows",
                "warn": "accuracy rises slightly with eps (inside the interval: noise?)",
                "fail": "accuracy rises with eps beyond the interval: the attack is broken "
                "or the gradients are masked",
            }[status]
        subject = (
            f"{first['run']} {first['attack']} steps={int(first['steps'])} {first['precision']}"
        )
        out.append(CheckResult("eps_sweep", status, subject, numbers, message))
    if not out:
        out.append(
            CheckResult(
                "eps_sweep",
                "skip",
                "all",
                "",
                "no PGD rows at several eps (`robustlr check` runs an eps sweep)",
            )
        )
    return out


def check_regular_near_zero(table: Table9 | None) -> list[CheckResult]:
    """Regular-trained networks fall to near 0% under the report's PGD attacks."""
    name = "regular_near_zero"
    if table is None:
        return [CheckResult(name, "skip", "all", "", "needs the Table 9 selection")]
    out = []
    for network in table.networks:
        found = [
            (cell, table.cells[(network, cell)])
            for cell in ("regular_untargeted", "regular_targeted")
            if (network, cell) in table.cells
        ]
        if not found:
            why = (
                "no regular-trained run"
                if (network, "regular") not in table.runs
                else f"its regular run has no PGD row at eps {eps_text(table.eps)}"
            )
            out.append(CheckResult(name, "skip", network, "", why))
            continue
        worst = max(float(row["accuracy"]) for _, row in found)
        status = "pass" if worst <= NEAR_ZERO else "warn" if worst <= NEAR_ZERO_WARN else "fail"
        numbers = ", ".join(f"{cell}: {_pct(float(row['accuracy']))}" for cell, row in found)
        message = {
            "pass": "the regular-trained model falls to ~0% under the report's attack",
            "warn": f"the regular-trained model keeps more than {NEAR_ZERO:g}% under attack",
            "fail": f"the regular-trained model keeps more than {NEAR_ZERO_WARN:g}% under a "
            "white-box attack: the attack is too weak or gradients are masked",
        }[status]
        out.append(CheckResult(name, status, network, numbers, message))
    return out


def check_untargeted_le_targeted(results: pd.DataFrame) -> list[CheckResult]:
    """Untargeted PGD is at least as strong as targeted PGD with the same settings, per run."""
    name = "untargeted_le_targeted"
    pgd = results[results["attack"].isin(PGD)].copy()
    pgd["eps_key"] = pgd["eps"].round(9)
    pgd["step_key"] = pgd["step_size"].round(9)
    keys = [RUN_KEY, "run", "norm", "eps_key", "steps", "step_key", "restarts", "precision"]
    keys.append("subset_sha256")
    untargeted = pgd[pgd["target_policy"] == "none"]
    targeted = pgd[pgd["target_policy"] == "random"]
    merged = untargeted.merge(targeted, on=keys, suffixes=("_u", "_t"))
    out = []
    for run, group in merged.groupby("run", sort=True):
        statuses, numbers = [], []
        for _, row in group.iterrows():
            u, t, t_high = row["accuracy_u"], row["accuracy_t"], row["accuracy_high_t"]
            statuses.append("pass" if u <= t else "warn" if u <= t_high else "fail")
            numbers.append(
                f"eps {eps_text(row['eps_u'])} {int(row['steps'])} steps: "
                f"untargeted {_pct(u)} vs targeted {_pct(t)}"
            )
        status = worst_status(statuses)
        message = {
            "pass": "untargeted accuracy <= targeted accuracy",
            "warn": "untargeted accuracy above targeted, inside the interval",
            "fail": "untargeted accuracy above targeted beyond the interval: the untargeted "
            "attack underperforms",
        }[status]
        out.append(CheckResult(name, status, str(run), "; ".join(numbers), message))
    if not out:
        out.append(
            CheckResult(
                name, "skip", "all", "", "no targeted and untargeted PGD rows with equal settings"
            )
        )
    return out


def _correct(row: pd.Series) -> np.ndarray | None:
    path = str(row.get(OUTCOMES_PATH, "") or "")
    if not path or not Path(path).is_file():
        return None
    try:
        data = load_outcomes(path)
    except (OSError, ValueError, KeyError):
        return None
    if data["subset_sha256"] != row["subset_sha256"]:
        return None
    return np.asarray(data["correct"], dtype=bool)


def check_blackbox_weaker(results: pd.DataFrame) -> list[CheckResult]:
    """Square (black-box) is not stronger than white-box untargeted PGD, per example."""
    name = "blackbox_weaker"
    square = results[results["attack"] == "square"]
    out = []
    for _, sq in square.iterrows():
        pgd = results[
            (results[RUN_KEY] == sq[RUN_KEY])
            & results["attack"].isin(("pgd", "pgd-untargeted"))
            & (results["target_policy"] == "none")
            & eps_matches(results["eps"], float(sq["eps"]))
            & (results["norm"] == sq["norm"])
            & (results["subset_sha256"] == sq["subset_sha256"])
        ]
        subject = f"{sq['run']} eps {eps_text(sq['eps'])}"
        if pgd.empty:
            out.append(
                CheckResult(name, "skip", subject, "", "no untargeted PGD row on the same images")
            )
            continue
        best = pgd.sort_values("accuracy").iloc[0]
        numbers = f"square {_pct(float(sq['accuracy']))}, pgd {_pct(float(best['accuracy']))}"
        square_correct, pgd_correct = _correct(sq), _correct(best)
        if (
            square_correct is None
            or pgd_correct is None
            or square_correct.shape != pgd_correct.shape
        ):
            out.append(
                CheckResult(
                    name,
                    "skip",
                    subject,
                    numbers,
                    "per-example comparison needs outcomes files of both rows "
                    "(robustlr eval --save-examples)",
                )
            )
            continue
        test = mcnemar(pgd_correct, square_correct)  # only_a: PGD failed, Square succeeded
        n = int(pgd_correct.size)
        numbers += f"; only square succeeds on {test.only_a}/{n}, only pgd on {test.only_b}"
        if test.only_a > test.only_b and test.significant():
            status = "fail"
            message = "Square beats white-box PGD significantly: gradient masking?"
        elif test.only_a > SQUARE_EXTRA_SHARE * n:
            status = "warn"
            message = "Square breaks examples PGD misses: add restarts or steps"
        else:
            status, message = "pass", "Square is not stronger than white-box PGD"
        out.append(CheckResult(name, status, subject, numbers, message))
    if not out:
        out.append(
            CheckResult(name, "skip", "all", "", "no Square (black-box) rows in the results")
        )
    out.append(
        CheckResult("transfer_weaker", "skip", "all", "", "transfer attacks are not evaluated yet")
    )
    return out


def check_low_precision(results: pd.DataFrame) -> list[CheckResult]:
    """A bf16/fp16 attack agrees with the same fp32 attack within the fp32 interval."""
    name = "low_precision_agrees"
    rows = results[results["attack"] != "clean"].copy()
    rows["eps_key"] = rows["eps"].round(9)
    rows["step_key"] = rows["step_size"].round(9)
    keys = [RUN_KEY, "run", "attack", "norm", "eps_key", "steps", "step_key", "restarts"]
    keys += ["target_policy", "subset_sha256"]
    low = rows[rows["precision"].isin(("bf16", "fp16"))]
    full = rows[rows["precision"] == "fp32"]
    merged = low.merge(full, on=keys, suffixes=("", "_fp32"))
    out = []
    for _, row in merged.iterrows():
        acc, lo32, hi32 = row["accuracy"], row["accuracy_low_fp32"], row["accuracy_high_fp32"]
        if lo32 <= acc <= hi32:
            status, message = "pass", f"{row['precision']} attack agrees with fp32"
        elif row["accuracy_low"] <= hi32 and row["accuracy_high"] >= lo32:
            status = "warn"
            message = f"{row['precision']} attack outside the fp32 interval (intervals overlap)"
        else:
            status = "fail"
            message = f"{row['precision']} attack disagrees with fp32: precision loss in the attack"
        numbers = (
            f"{row['precision']} {_pct(acc)} vs fp32 {_pct(row['accuracy_fp32'])} "
            f"[{_pct(lo32)}, {_pct(hi32)}]"
        )
        subject = f"{row['run']} {row['attack']} eps {eps_text(row['eps'])}"
        out.append(CheckResult(name, status, subject, numbers, message))
    if not out:
        out.append(
            CheckResult(
                name, "skip", "all", "", "no bf16/fp16 attack with an fp32 twin in the results"
            )
        )
    return out


def check_zero_gradients(results: pd.DataFrame) -> list[CheckResult]:
    """The share of examples whose input gradient is exactly zero stays small, per run."""
    name = "zero_gradients"
    rows = results[results["attack"].isin((*PGD, "fgsm")) & results["zero_grad_fraction"].notna()]
    out = []
    for run, group in rows.groupby("run", sort=True):
        worst = group.sort_values("zero_grad_fraction").iloc[-1]
        share = float(worst["zero_grad_fraction"])
        status = (
            "pass" if share <= ZERO_GRAD_PASS else "warn" if share <= ZERO_GRAD_WARN else "fail"
        )
        numbers = f"max {100 * share:.1f}% ({worst['attack']} eps {eps_text(worst['eps'])})"
        message = {
            "pass": "input gradients are rarely exactly zero",
            "warn": "some input gradients are exactly zero (saturated logits?)",
            "fail": "many input gradients are exactly zero: gradient masking, the attack "
            "cannot move",
        }[status]
        out.append(CheckResult(name, status, str(run), numbers, message))
    if not out:
        out.append(CheckResult(name, "skip", "all", "", "no PGD/FGSM rows with zero-gradient data"))
    return out


def run_checks(results: pd.DataFrame, table: Table9 | None = None) -> list[CheckResult]:
    """Every result-based check; eval-mode determinism needs the model (``live_checks``)."""
    checks = [
        *check_monotone(results, "steps"),
        *check_monotone(results, "restarts"),
        *check_eps_sweep(results),
        *check_regular_near_zero(table),
        *check_untargeted_le_targeted(results),
        *check_blackbox_weaker(results),
        *check_low_precision(results),
        *check_zero_gradients(results),
        CheckResult(
            "eval_determinism",
            "skip",
            "all",
            "",
            "needs the model: run `robustlr check --checkpoint PATH`",
        ),
    ]
    log.info("checks: %s", ", ".join(f"{c.check}={c.status}" for c in checks))
    return checks
