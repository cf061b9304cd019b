"""The digits study's suites feed every sanity check of the report: with the rows of `digits`
and `digits-sweeps` (and the runs' checkpoints), no check is skipped; the plots draw the
measured points of one attack setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import write_outcome_run

from robustlr.attacks.suites import load_suite
from robustlr.checkpoint import save_checkpoint
from robustlr.eval.runner import RESULT_COLUMNS, subset_sha256
from robustlr.eval.session import load_eval_images
from robustlr.models import create_model
from robustlr.report import ReportSettings, make_report
from robustlr.report.checks import STATUSES
from robustlr.report.files import report_file
from robustlr.report.plots import eps_curves
from robustlr.runs import BEST

N = 32
NETWORKS = ("resnet26", "resnet50")


def _share(spec) -> float:
    """A plausible accuracy for a spec: falls with eps and (slightly) with steps."""
    if spec.name == "clean":
        return 0.9
    drop = spec.eps * 255 / 60 + 0.02 * np.log(max(spec.steps, 1))
    return float(np.clip(0.8 - drop, 0.0, 1.0))


def _outcomes(share: float, rng: np.random.Generator) -> np.ndarray:
    return rng.random(N) < share


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Two networks x two modes, seed 0: the digits and digits-sweeps rows with outcomes on the
    first N digits test images, and a (random-weight) checkpoint in every run."""
    root = tmp_path / "runs"
    _, labels, indices = load_eval_images("digits", "test", None, 16, N)
    subset = subset_sha256(labels, indices)
    specs = [*load_suite("digits"), *load_suite("digits-sweeps")]
    rng = np.random.default_rng(0)
    for arch in NETWORKS:
        for mode in ("adversarial", "regular"):
            attacks = [(spec, _outcomes(_share(spec), rng)) for spec in specs]
            run = write_outcome_run(root, f"{arch}-{mode}-s0", arch, mode, attacks, "0", subset)
            options = {"small_input": True, "width": 0.125}
            payload = {
                "model": create_model(arch, num_classes=10, **options).state_dict(),
                "arch": arch,
                "model_options": options,
                "num_classes": 10,
                "epoch": 1,
                "config": {"dataset": "digits", "mode": mode, "image_size": 16, "seed": 0},
            }
            save_checkpoint(payload, run / BEST)
    return root


@pytest.mark.slow
def test_every_check_runs_with_the_digits_suites(study, tmp_path):
    made = make_report(ReportSettings(eps=48 / 255), report_file(tmp_path / "out"), runs_dir=study)
    statuses = {}
    for check in made.checks:
        assert check.status in STATUSES
        statuses.setdefault(check.check, set()).add(check.status)
    skipped = {
        name: [c.message for c in made.checks if c.check == name]
        for name, found in statuses.items()
        if found == {"skip"}
    }
    expected = {
        "more_steps", "more_restarts", "eps_sweep", "regular_near_zero",
        "untargeted_le_targeted", "blackbox_weaker", "pgd_not_optimistic",
        "low_precision_agrees", "zero_gradients", "eval_determinism", "transfer_weaker",
    }  # fmt: skip
    assert expected <= set(statuses)
    assert not {k: v for k, v in skipped.items() if k in expected}, skipped
    determinism = [c for c in made.checks if c.check == "eval_determinism"]
    assert len(determinism) == 4 and {c.status for c in determinism} == {"pass"}
    # the fake white-box outcomes keep most images; transfer from a random net breaks more
    transfer = [c for c in made.checks if c.check == "transfer_weaker"]
    assert len(transfer) == 2 and all("only transfer breaks" in c.numbers for c in transfer)


def test_eval_rows_carry_the_training_seed(study):
    import torch

    from robustlr.eval.session import open_checkpoint

    target = open_checkpoint(next(study.rglob(BEST)), torch.device("cpu"))
    assert target.meta["train_seed"] == "0"
    assert "train_seed" in RESULT_COLUMNS


@pytest.mark.slow
def test_model_checks_name_what_is_missing(study, tmp_path):
    for best in study.rglob(BEST):
        best.unlink()
    made = make_report(ReportSettings(eps=48 / 255), report_file(tmp_path / "out"), runs_dir=study)
    for name in ("eval_determinism", "transfer_weaker"):
        rows = [c for c in made.checks if c.check == name]
        assert rows and all(c.status == "skip" for c in rows)
        assert all("no checkpoint in" in c.message and BEST in c.message for c in rows)


def test_eps_curve_is_one_attack_setting(study):
    from robustlr.report import collect_results

    results = collect_results(runs_dir=study)
    steps, curves = eps_curves(results)
    assert steps == 10
    curve = curves["resnet26 (adversarial, seed 0)"]
    # 0 (clean), 8, 16, 24, 32, 48, 64, 96: every point PGD-10 with one start
    assert [round(e * 255) for e in curve["eps"]] == [0, 8, 16, 24, 32, 48, 64, 96]
    assert set(curve.loc[curve["eps"] > 0, "steps"]) == {10}
