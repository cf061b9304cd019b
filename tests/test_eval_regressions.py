"""Regression tests of evaluation integrity (issue 14), written against APIs that predate the
fix so that they can be run on the old code too: outcome files that overwrite each other (1),
a stale derived step size (2), targeted restarts that repair images (3), per-example seeds
shared by pairs of ids (5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import small_model

from robustlr.attacks import AttackSpec, run_attack
from robustlr.attacks.pgd import example_seed
from robustlr.cli.eval import build_specs
from robustlr.eval.runner import evaluate, load_outcomes
from robustlr.eval.session import EvalTarget, evaluate_checkpoint
from robustlr.report.pairs import paired_test
from robustlr.report.results import read_result_csv

# --- defect 1: outcome files belong to their rows ------------------------------------------


def _target(run: Path) -> EvalTarget:
    meta = {"run": run.name, "arch": "tiny", "train_mode": "regular", "dataset": "digits",
            "checkpoint_sha256": "c" * 64}  # fmt: skip
    return EvalTarget(run / "best.pt", run, small_model().eval(), meta, {}, 8)


def test_outcome_files_are_unique_to_the_threat_model_and_checked(tmp_path, batch):
    x, y = batch
    run = tmp_path / "run"
    out_csv = run / "eval.csv"
    common = {"images": x, "labels": y, "indices": list(range(len(y))), "split": "test",
              "out_csv": out_csv, "batch_size": 8, "device": torch.device("cpu"),
              "examples_dir": run / "outcomes"}  # fmt: skip
    # the example: same name, steps, eps; step size and precision differ
    a = AttackSpec("pgd-untargeted", eps=64 / 255, steps=2, precision="bf16")
    b = AttackSpec("pgd-untargeted", eps=64 / 255, steps=2, step_size=1 / 255)
    # evaluation adds a clean row to every call: keep the attack's row
    (row_a,) = [
        r for r in evaluate_checkpoint(_target(run), [a], **common) if r["attack"] == a.name
    ]
    (row_b,) = [
        r for r in evaluate_checkpoint(_target(run), [b], **common) if r["attack"] == b.name
    ]
    assert row_a["outcomes_file"] != row_b["outcomes_file"]
    for written in (row_a, row_b):
        data = load_outcomes(run / written["outcomes_file"])
        assert 100 * data["correct"].mean() == pytest.approx(written["accuracy"])
    rows = read_result_csv(out_csv)
    rows = rows[rows["attack"] == a.name].reset_index(drop=True)
    assert len(rows) == 2
    assert paired_test(rows.iloc[0], rows.iloc[1])["note"] == ""
    # a row pointing at another row's file is refused, with the differing fields
    swapped = rows.iloc[0].copy()
    swapped["outcomes_path"] = rows.iloc[1]["outcomes_path"]
    note = paired_test(swapped, rows.iloc[1])["note"]
    assert "another threat model" in note and "step_size" in note and "\n" not in note


# --- defect 2: a derived step size follows eps and steps -----------------------------------


def test_derived_step_size_is_rederived_when_eps_or_steps_change():
    digits = build_specs((), "digits", {"eps": 16 / 255})
    pgd = [s for s in digits if s.name.startswith("pgd-")]
    assert pgd and all("step=4/255" in s.describe() for s in pgd)  # 2.5 * 16/255 / 10
    more = [s for s in build_specs((), "digits", {"steps": 100}) if s.name.startswith("pgd-")]
    assert all("step=0.00470588" in s.describe() for s in more)  # 2.5 * 48/255 / 100
    spec = AttackSpec("pgd-untargeted", eps=48 / 255, steps=10)
    assert "step=4/255" in spec.with_options(eps=16 / 255).describe()
    assert "step=0.00470588" in spec.with_options(steps=100).describe()
    given = AttackSpec("pgd-untargeted", eps=48 / 255, step_size=2 / 255)
    assert "step=2/255" in given.with_options(eps=16 / 255).describe()  # a given step stays


# --- defect 3: targeted restarts keep the worst case ---------------------------------------


def test_targeted_restarts_never_raise_accuracy():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(200, 3, 8, 8, generator=gen)
    model = small_model(0).eval()
    with torch.no_grad():  # labels the model gets right: misses that are not hits are common
        y = model(x).argmax(1)
    one = AttackSpec("pgd-targeted", eps=16 / 255, steps=2, seed=1)
    five = AttackSpec("pgd-targeted", eps=16 / 255, steps=2, restarts=5, seed=1)
    r1, r5 = evaluate(model, x, y, [one, five], batch_size=200)
    # restart 0 of the five is the single run: an image it misclassified stays misclassified
    assert not (r5.correct & ~r1.correct).any()
    assert r5.accuracy <= r1.accuracy
    assert not (r1.success & ~r5.success).any()  # and a hit target stays hit


# --- defect 5: per-example seeds ----------------------------------------------------------


def test_neighbouring_example_ids_get_their_own_random_start():
    assert len({example_seed(0, 0, i) for i in range(1000)}) == 1000
    x = torch.full((2, 3, 8, 8), 0.5)
    spec = AttackSpec("pgd-untargeted", eps=0.1, steps=1, step_size=0.0)
    for ids in ([2, 3], [10, 11]):
        out = run_attack(
            small_model(), x, torch.zeros(2, dtype=torch.long), spec, example_ids=torch.tensor(ids)
        )
        assert not torch.equal(out.x_adv[0], out.x_adv[1])
