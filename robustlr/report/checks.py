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

import numpy as np
import pandas as pd

from robustlr.attacks.registry import ATTACKS, names_where
from robustlr.eval.stats import mcnemar
from robustlr.report.curves import broken_within
from robustlr.report.results import RUN_KEY, eps_matches, row_outcomes
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
PGD_APGD_GAP = 3.0  # points by which Table 9's PGD may exceed APGD-CE before a warning
PGD = names_where(family="pgd")  # robustlr's own PGD attacks
# where the rows a skipped check needs come from (named in its message)
SWEEP_SUITE = "the digits-sweeps suite (attacks/digits-sweeps.toml)"
SWEEPS = f"{SWEEP_SUITE} or `robustlr check`"
BLACK_BOX = names_where(white_box=False)
ZERO_GRADIENT_ATTACKS = tuple(a.name for a in ATTACKS.values() if a.reports_zero_gradients)
PRECISION_ATTACKS = tuple(a.name for a in ATTACKS.values() if "precision" in a.takes)
REFERENCE_ATTACKS = tuple(a.name for a in ATTACKS.values() if a.reference == "apgd_ce")
WHITE_BOX = tuple(a.name for a in ATTACKS.values() if a.white_box and a.family != "clean")
MIN_NORM_WHITE_BOX = names_where(min_norm=True, white_box=True)
MASKING_SHARE = 0.01  # images only a black-box attack breaks: up to this share (or 1) warns
# the attacks whose rows each check examines (all chosen by registry properties, so a new
# attack joins the checks its properties call for; ``check_coverage`` names the others)
CHECK_SUBJECTS: dict[str, tuple[str, ...]] = {
    "more_steps": PGD,
    "more_restarts": PGD,
    "eps_sweep": PGD,
    "regular_near_zero": PGD,
    "untargeted_le_targeted": PGD,
    "blackbox_weaker": (*BLACK_BOX, *PGD),
    "pgd_not_optimistic": (*PGD, *REFERENCE_ATTACKS),
    "low_precision_agrees": PRECISION_ATTACKS,
    "zero_gradients": ZERO_GRADIENT_ATTACKS,
    "gradient_masking": (*BLACK_BOX, *MIN_NORM_WHITE_BOX),
}


def checks_for(attack: str) -> tuple[str, ...]:
    """The result-based checks that examine rows of ``attack``."""
    return tuple(check for check, names in CHECK_SUBJECTS.items() if attack in names)


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
                f"no PGD rows differing only in {along} (same run, attack, eps, images, "
                f"{other}): run a sweep such as {SWEEPS}",
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
                "no PGD rows at several eps with equal steps and restarts on the same run and "
                f"images: run an eps sweep such as {SWEEPS}",
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


def check_blackbox_weaker(results: pd.DataFrame) -> list[CheckResult]:
    """Black-box attacks (registry ``white_box`` False, e.g. Square) are not stronger than
    white-box untargeted PGD on the same images, per example."""
    name = "blackbox_weaker"
    blackbox = results[results["attack"].isin(BLACK_BOX)]
    out = []
    for _, bb in blackbox.iterrows():
        attack = str(bb["attack"])
        pgd = results[
            (results[RUN_KEY] == bb[RUN_KEY])
            & results["attack"].isin(PGD)
            & (results["target_policy"] == "none")
            & eps_matches(results["eps"], float(bb["eps"]))
            & (results["norm"] == bb["norm"])
            & (results["subset_sha256"] == bb["subset_sha256"])
        ]
        subject = f"{bb['run']} {attack} eps {eps_text(bb['eps'])}"
        if pgd.empty:
            out.append(
                CheckResult(name, "skip", subject, "", "no untargeted PGD row on the same images")
            )
            continue
        best = pgd.sort_values("accuracy").iloc[0]
        numbers = f"{attack} {_pct(float(bb['accuracy']))}, pgd {_pct(float(best['accuracy']))}"
        (bb_correct, why_bb), (pgd_correct, why_pgd) = row_outcomes(bb), row_outcomes(best)
        if bb_correct is None or pgd_correct is None or bb_correct.shape != pgd_correct.shape:
            why = why_bb or why_pgd or "the outcomes files differ in length"
            out.append(
                CheckResult(
                    name,
                    "skip",
                    subject,
                    numbers,
                    f"no per-example comparison: {why} (robustlr eval --save-examples)",
                )
            )
            continue
        test = mcnemar(pgd_correct, bb_correct)  # only_a: PGD failed, the black box succeeded
        n = int(pgd_correct.size)
        numbers += f"; only {attack} succeeds on {test.only_a}/{n}, only pgd on {test.only_b}"
        if test.only_a > test.only_b and test.significant():
            status = "fail"
            message = f"{attack} (black-box) beats white-box PGD significantly: gradient masking?"
        elif test.only_a > SQUARE_EXTRA_SHARE * n:
            status = "warn"
            message = f"{attack} (black-box) breaks examples PGD misses: add restarts or steps"
        else:
            status, message = "pass", f"{attack} (black-box) is not stronger than white-box PGD"
        out.append(CheckResult(name, status, subject, numbers, message))
    if not out:
        out.append(
            CheckResult(
                name,
                "skip",
                "all",
                "",
                f"no black-box ({', '.join(BLACK_BOX)}) rows in the results: run one, as "
                f"{SWEEP_SUITE} does",
            )
        )
    out.append(
        CheckResult(
            "transfer_weaker",
            "skip",
            "all",
            "",
            "needs the models: the report runs it from the runs' checkpoints",
        )
    )
    return out


def check_pgd_vs_apgd(table: Table9 | None) -> list[CheckResult]:
    """Table 9's untargeted PGD is not optimistic: per network and training mode, its accuracy
    is at most ``PGD_APGD_GAP`` points above APGD-CE's on the same images, eps and norm (the
    reference cells of ``Table9.references``)."""
    name = "pgd_not_optimistic"
    if table is None:
        return [CheckResult(name, "skip", "all", "", "needs the Table 9 selection")]
    out = []
    for network in table.networks:
        for mode in ("adv", "regular"):
            pgd = table.cells.get((network, f"{mode}_untargeted"))
            apgd = table.references.get((network, f"{mode}_apgd_ce"))
            if pgd is None:
                continue
            subject = f"{network} ({'adversarial' if mode == 'adv' else 'regular'})"
            if apgd is None:
                out.append(
                    CheckResult(
                        name,
                        "skip",
                        subject,
                        "",
                        f"no APGD-CE row at eps {eps_text(table.eps)} "
                        "(add apgd-ce to the eval suite)",
                    )
                )
                continue
            if apgd["subset_sha256"] != pgd["subset_sha256"]:
                out.append(
                    CheckResult(
                        name, "skip", subject, "", "APGD-CE and PGD rows are on different images"
                    )
                )
                continue
            gap = float(pgd["accuracy"]) - float(apgd["accuracy"])
            numbers = (
                f"PGD-{int(pgd['steps'])} {_pct(float(pgd['accuracy']))}, "
                f"APGD-CE-{int(apgd['steps'])} {_pct(float(apgd['accuracy']))} "
                f"(gap {gap:+.1f} points, n={int(pgd['n'])})"
            )
            if gap > PGD_APGD_GAP:
                status = "warn"
                message = (
                    f"Table 9's PGD is {gap:.1f} points above APGD-CE: its robust accuracy is "
                    "optimistic; quote the APGD-CE column beside it"
                )
            else:
                status = "pass"
                message = f"Table 9's PGD is within {PGD_APGD_GAP:g} points of APGD-CE"
            out.append(CheckResult(name, status, subject, numbers, message))
    if not out:
        out.append(CheckResult(name, "skip", "all", "", "no untargeted PGD cell in Table 9"))
    return out


def check_low_precision(results: pd.DataFrame) -> list[CheckResult]:
    """A bf16/fp16 attack agrees with the same fp32 attack within the fp32 interval."""
    name = "low_precision_agrees"
    rows = results[results["attack"].isin(PRECISION_ATTACKS)].copy()
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
                name,
                "skip",
                "all",
                "",
                "no bf16/fp16 attack with an fp32 twin (same attack, eps, steps, step size, "
                f"restarts, targets, images) in the results: run one, as {SWEEP_SUITE} "
                "does",
            )
        )
    return out


def check_zero_gradients(results: pd.DataFrame) -> list[CheckResult]:
    """The share of examples whose input gradient is exactly zero stays small, per run."""
    name = "zero_gradients"
    rows = results[
        results["attack"].isin(ZERO_GRADIENT_ATTACKS) & results["zero_grad_fraction"].notna()
    ]
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


def _eps_label(norm: str, eps: float) -> str:
    return eps_text(eps) if norm == "linf" else f"{eps:g}"


def check_gradient_masking(results: pd.DataFrame) -> list[CheckResult]:
    """No black-box attack (registry ``white_box`` False: decision-based HopSkipJump,
    score-based Square) breaks images that no white-box attack breaks, per example, on the
    same run, images, norm and eps: the white-box attacks are fixed-budget rows at that eps or
    below and minimum-norm rows (FMN, DDN) through their norms. Gradient masking makes
    white-box attacks miss what a gradient-free one finds. Fails when more than
    ``MASKING_SHARE`` of the images (and more than one) are broken only by the black box."""
    name = "gradient_masking"
    out = []
    for _, bb in results[results["attack"].isin(BLACK_BOX)].iterrows():
        attack, norm, eps = str(bb["attack"]), str(bb["norm"]), float(bb["eps"])
        subject = f"{bb['run']} {attack} {norm} eps {_eps_label(norm, eps)}"
        white = results[
            (results[RUN_KEY] == bb[RUN_KEY])
            & results["attack"].isin(WHITE_BOX)
            & (results["norm"] == norm)
            & (results["subset_sha256"] == bb["subset_sha256"])
        ]
        black, why = broken_within(bb, eps)
        if black is None:
            out.append(CheckResult(name, "skip", subject, "", f"no per-example outcomes: {why}"))
            continue
        union = np.zeros_like(black)
        used = []
        for _, wb in white.iterrows():
            broken, _ = broken_within(wb, eps)
            if broken is not None and broken.shape == black.shape:
                union |= broken
                used.append(str(wb["attack"]))
        if not used:
            out.append(
                CheckResult(
                    name,
                    "skip",
                    subject,
                    "",
                    "no white-box row with outcomes on the same images, norm and eps "
                    "(robustlr eval --save-examples)",
                )
            )
            continue
        n = int(black.size)
        only = int((black & ~union).sum())
        numbers = (
            f"{attack} breaks {int(black.sum())}/{n}, white-box ({', '.join(sorted(set(used)))}) "
            f"{int(union.sum())}/{n}; only {attack}: {only}"
        )
        if only > max(1, MASKING_SHARE * n):
            status = "fail"
            message = (
                f"{attack} (black-box) breaks images no white-box attack breaks: the white-box "
                "attacks are weaker than a gradient-free one (gradient masking?)"
            )
        elif only:
            status = "warn"
            message = f"{attack} (black-box) breaks a few images no white-box attack breaks"
        else:
            status = "pass"
            message = f"every image {attack} (black-box) breaks, a white-box attack breaks too"
        out.append(CheckResult(name, status, subject, numbers, message))
    if not out:
        out.append(
            CheckResult(
                name,
                "skip",
                "all",
                "",
                f"no black-box ({', '.join(BLACK_BOX)}) rows in the results",
            )
        )
    return out


def check_coverage(results: pd.DataFrame) -> list[CheckResult]:
    """Attacks in the results that no sanity check examines are named (skip), and attack
    names unknown to the registry warn: no attack drops out of the checks silently."""
    name = "attack_coverage"
    out = []
    for attack in sorted(set(results["attack"]) - {"clean"}):
        if attack not in ATTACKS:
            out.append(
                CheckResult(
                    name, "warn", attack, "", "unknown attack name: no sanity check examines it"
                )
            )
        elif not checks_for(attack):
            out.append(
                CheckResult(
                    name,
                    "skip",
                    attack,
                    "",
                    f"no sanity check examines {attack} rows ({ATTACKS[attack].family} family); "
                    "they are reported as they are",
                )
            )
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
        *check_pgd_vs_apgd(table),
        *check_low_precision(results),
        *check_zero_gradients(results),
        *check_gradient_masking(results),
        *check_coverage(results),
        CheckResult(
            "eval_determinism",
            "skip",
            "all",
            "",
            "needs the model: the report runs it from the runs' checkpoints (or `robustlr check "
            "--checkpoint PATH`)",
        ),
    ]
    log.info("checks: %s", ", ".join(f"{c.check}={c.status}" for c in checks))
    return checks
