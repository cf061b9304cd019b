"""Every sanity check of the report bites: for each, constructed results on which it fails
(or warns) and results on which it passes, judged through ``run_checks`` (the report's entry
point) or, for the checks that need the model, ``check_determinism`` / ``check_model``.

``CASES`` names every check ``run_checks`` can emit; ``test_every_check_has_cases`` fails when
a check is added without cases here (or without a reason in ``PLACEHOLDERS``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import results_with_outcomes, row, write_run
from torch import nn

from robustlr.attacks.spec import AttackSpec
from robustlr.eval.runner import AttackResult, save_outcomes
from robustlr.report import build_table9, collect_results, run_checks
from robustlr.report.checks import worst_status
from robustlr.report.live_checks import check_determinism, check_model

# checks that never judge anything today, with the reason (the test checks they only skip)
PLACEHOLDERS = {
    "transfer_weaker": "transfer attacks are not evaluated yet",
    "eval_determinism": "needs the model: judged by check_determinism (tested below)",
}

Rows = list[dict[str, object]]


def _judge(tmp_path: Path, runs: dict[tuple[str, str, str], Rows], check: str) -> str:
    """The worst status of ``check`` over results written as runs {(name, arch, mode): rows}."""
    root = tmp_path / "runs"
    for (name, arch, mode), rows in runs.items():
        write_run(root, name, arch, mode, rows)
    results = collect_results(runs_dir=root)
    statuses = [c.status for c in run_checks(results, build_table9(results)) if c.check == check]
    return worst_status(statuses)


def _adv(*rows: dict[str, object]) -> dict[tuple[str, str, str], Rows]:
    return {("resnet26-adv", "resnet26", "adversarial"): [row("clean", 90.0), *rows]}


def _regular(*rows: dict[str, object]) -> dict[tuple[str, str, str], Rows]:
    return {("resnet26-regular", "resnet26", "regular"): [row("clean", 90.0), *rows]}


def _pgd(accuracy: float, **extra: object) -> dict[str, object]:
    return row("pgd-untargeted", accuracy, **extra)


E4, E8 = 4 / 255, 8 / 255
# check -> [(expected worst status, results)]; every check has a failing (or warning) case
# and a passing one ("skip" for attack_coverage, which only ever flags: nothing to flag)
CASES: dict[str, list[tuple[str, dict[tuple[str, str, str], Rows]]]] = {
    "more_steps": [
        ("fail", _adv(_pgd(10.0, steps=10), _pgd(30.0, steps=50))),
        ("warn", _adv(_pgd(10.0, steps=10), _pgd(11.0, steps=50))),
        ("pass", _adv(_pgd(30.0, steps=10), _pgd(10.0, steps=50))),
    ],
    "more_restarts": [
        ("fail", _adv(_pgd(10.0, restarts=1), _pgd(30.0, restarts=5))),
        ("pass", _adv(_pgd(10.0, restarts=1), _pgd(9.0, restarts=5))),
    ],
    "eps_sweep": [
        ("fail", _adv(_pgd(10.0, eps=E4), _pgd(40.0, eps=E8))),
        ("warn", _adv(_pgd(50.0, eps=E4), _pgd(30.0, eps=E8))),  # still 30% at the end
        ("pass", _adv(_pgd(30.0, eps=E4), _pgd(2.0, eps=E8))),
    ],
    "regular_near_zero": [
        ("fail", _regular(_pgd(40.0))),
        ("warn", _regular(_pgd(10.0))),
        ("pass", _regular(_pgd(1.0))),
    ],
    "untargeted_le_targeted": [
        ("fail", _adv(_pgd(40.0), row("pgd-targeted", 20.0))),
        ("pass", _adv(_pgd(10.0), row("pgd-targeted", 20.0))),
    ],
    "pgd_not_optimistic": [
        ("warn", _adv(_pgd(40.0), row("apgd-ce", 20.0, step_size=""))),
        ("pass", _adv(_pgd(21.0), row("apgd-ce", 20.0, step_size=""))),
    ],
    "low_precision_agrees": [
        ("fail", _adv(_pgd(20.0), _pgd(40.0, precision="bf16"))),
        ("warn", _adv(_pgd(20.0), _pgd(23.5, precision="bf16"))),
        ("pass", _adv(_pgd(20.0), _pgd(20.5, precision="bf16"))),
    ],
    "zero_gradients": [
        ("fail", _adv(_pgd(20.0, zero_grad_fraction=0.5))),
        ("warn", _adv(_pgd(20.0, zero_grad_fraction=0.05))),
        ("pass", _adv(_pgd(20.0, zero_grad_fraction=0.0))),
    ],
    "attack_coverage": [
        ("warn", _adv(_pgd(20.0), row("deepfool", 20.0))),  # unknown to the registry
        ("skip", _adv(_pgd(20.0))),
    ],
}


def test_every_check_has_cases(tmp_path):
    """Every check run_checks can emit (on results that exercise all of them) has cases here,
    with a failing or warning one and a passing one, or is a placeholder with a reason."""
    emitted = {c.check for c in run_checks(collect_results(runs_dir=_all_rows(tmp_path)))}
    covered = set(CASES) | set(OUTCOME_CASES) | set(PLACEHOLDERS) | {"blackbox_weaker"}
    assert emitted <= covered, f"checks without bite cases: {sorted(emitted - covered)}"
    for check, cases in {**CASES, **OUTCOME_CASES}.items():
        statuses = {status for status, _ in cases}
        assert statuses & {"fail", "warn"} and statuses & {"pass", "skip"}, check


def _all_rows(tmp_path: Path) -> Path:
    root = tmp_path / "all"
    rows = [row("clean", 90.0)] + [r for cases in CASES.values() for _, runs in cases
                                    for rs in runs.values() for r in rs]  # fmt: skip
    write_run(root, "everything", "resnet26", "adversarial", [*rows, row("square", 30.0)])
    return root


@pytest.mark.parametrize(
    ("check", "expected", "runs"),
    [
        pytest.param(check, status, runs, id=f"{check}-{status}")
        for check, cases in CASES.items()
        for status, runs in cases
    ],
)
def test_check_bites(tmp_path, check, expected, runs):
    assert _judge(tmp_path, runs, check) == expected


def test_placeholders_only_skip(tmp_path):
    results = collect_results(runs_dir=_all_rows(tmp_path))
    for c in run_checks(results, build_table9(results)):
        if c.check in PLACEHOLDERS:
            assert c.status == "skip", c


# --- blackbox_weaker: per-example outcomes (McNemar) --------------------------------------


def _outcome_run(root: Path, square_correct: np.ndarray, pgd_correct: np.ndarray) -> None:
    """One run whose Square and untargeted PGD rows carry outcome files of these outcomes."""
    run = root / "resnet26-adv"
    meta = {"run": "resnet26-adv", "arch": "resnet26", "train_mode": "adversarial",
            "dataset": "digits", "split": "test", "subset_sha256": "subset-x"}  # fmt: skip
    rows = []
    for spec, correct in (
        (AttackSpec("clean"), np.ones_like(pgd_correct)),
        (AttackSpec("pgd-untargeted", eps=E8), pgd_correct),
        (AttackSpec("square", eps=E8), square_correct),
    ):
        result = AttackResult(spec, correct, ~correct, None, passes=0, seconds=0.0)
        name = f"outcomes/{spec.name}.npz"
        save_outcomes(run / name, result, result.row(meta))
        rows.append(result.row(meta) | {"outcomes_file": name})
    pd.DataFrame(rows).to_csv(run / "eval.csv", index=False)


def _blackbox_status(tmp_path: Path, square_correct, pgd_correct) -> str:
    _outcome_run(tmp_path / "runs", np.array(square_correct), np.array(pgd_correct))
    results = collect_results(runs_dir=tmp_path / "runs")
    return worst_status(c.status for c in run_checks(results) if c.check == "blackbox_weaker")


def test_blackbox_stronger_than_pgd_fails(tmp_path):
    # Square breaks 20 images PGD misses, never the reverse: significant (McNemar)
    assert _blackbox_status(tmp_path, [False] * 20 + [True] * 80, [True] * 100) == "fail"


def test_blackbox_breaking_a_few_pgd_misses_warns(tmp_path):
    # 3 images only Square breaks, 2 only PGD: not significant, but above 1% of the images
    square = [False] * 3 + [True] * 2 + [True] * 95
    pgd = [True] * 3 + [False] * 2 + [True] * 95
    assert _blackbox_status(tmp_path, square, pgd) == "warn"


def test_blackbox_weaker_than_pgd_passes(tmp_path):
    assert _blackbox_status(tmp_path, [True] * 50 + [False] * 50, [False] * 100) == "pass"


# --- gradient_masking: per-example outcomes of black-box and white-box attacks -------------

N_IMAGES, L2_EPS = 100, 1.0
Broken = dict[str, range]  # attack -> the images it breaks at L2_EPS


def _masking_result(name: str, broken: range) -> AttackResult:
    """``name``'s result at L2_EPS on N_IMAGES images (all correct when clean) that breaks
    ``broken``; a minimum-norm attack carries norms (L2_EPS / 2 there, 2 L2_EPS elsewhere)."""
    spec = AttackSpec(name, norm="l2", eps=L2_EPS) if name != "clean" else AttackSpec(name)
    hit = np.isin(np.arange(N_IMAGES), list(broken))
    norms = np.where(hit, L2_EPS / 2, 2 * L2_EPS) if spec.info.min_norm else None
    return AttackResult(spec, ~hit, hit, None, passes=0, seconds=0.0, norms=norms)


# check -> [(expected worst status, the images each attack breaks)], judged on results with
# outcomes files (``helpers.results_with_outcomes``) through run_checks
OUTCOME_CASES: dict[str, list[tuple[str, Broken]]] = {
    "gradient_masking": [
        # Square (score-based) breaks 10 images PGD misses: more than 1% of them
        ("fail", {"square": range(10), "pgd-untargeted": range(10, 30)}),
        ("warn", {"square": range(11), "pgd-untargeted": range(1, 30)}),  # only image 0
        ("pass", {"square": range(10), "pgd-untargeted": range(30)}),
        # HopSkipJump (decision-based, a minimum-norm attack: judged by its norms)
        ("fail", {"hopskipjump": range(10), "pgd-untargeted": range(0)}),
        # FMN (white-box, minimum-norm) breaks them through its norms
        ("pass", {"hopskipjump": range(10), "pgd-untargeted": range(0), "fmn": range(10)}),
    ],
}


@pytest.mark.parametrize(
    ("check", "expected", "broken"),
    [
        pytest.param(check, status, broken, id=f"{check}-{status}-{'-'.join(broken)}")
        for check, cases in OUTCOME_CASES.items()
        for status, broken in cases
    ],
)
def test_outcome_check_bites(tmp_path, check, expected, broken):
    results = [_masking_result("clean", range(0))]
    results += [_masking_result(name, images) for name, images in broken.items()]
    frame = results_with_outcomes(tmp_path, results, arch="resnet26", mode="adversarial")
    assert worst_status(c.status for c in run_checks(frame) if c.check == check) == expected


# --- checks that need the model ------------------------------------------------------------


class _BatchDependent(nn.Module):
    """Logits that depend on the rest of the batch (what BatchNorm in train mode does)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x - x.mean(0, keepdim=True))


class _Quantised(nn.Module):
    """Inputs rounded to 4 levels before a linear model: every input gradient is exactly 0."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 3) / 3)


@pytest.mark.parametrize(
    ("wrap", "expected"), [(lambda m: m, "pass"), (_BatchDependent, "fail")], ids=["plain", "batch"]
)
def test_determinism_check(digits_model, wrap: Callable[[nn.Module], nn.Module], expected):
    model, x, _ = digits_model
    assert check_determinism(wrap(model), x[:16]).status == expected


LIVE = {"eps": 0.1, "steps": (2, 5), "eps_factors": (0.5, 1.0, 2.0), "sweep_steps": 5}


def test_live_checks_pass_on_a_model_attacks_can_break(digits_model):
    model, x, y = digits_model
    live = check_model(model, x[:32], y[:32], **LIVE)
    by_check = {c.check: c.status for c in live.checks}
    assert set(by_check) >= {"eval_determinism", "more_steps", "eps_sweep", "zero_gradients"}
    assert by_check["zero_gradients"] == "pass" and by_check["eval_determinism"] == "pass"
    assert "fail" not in by_check.values(), live.checks


def test_live_checks_catch_masked_gradients(digits_model):
    model, x, y = digits_model
    live = check_model(_Quantised(model), x[:32], y[:32], **LIVE)
    by_check = {c.check: c.status for c in live.checks}
    assert by_check["zero_gradients"] == "fail"
    assert by_check["eps_sweep"] in ("warn", "fail")  # PGD cannot move: accuracy stays up
