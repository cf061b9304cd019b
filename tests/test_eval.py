"""Evaluation runner, intervals, paired test and attack suites."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import small_model

from robustlr.attacks import AttackSpec, load_targets
from robustlr.attacks.suites import list_suites, load_suite
from robustlr.eval import RESULT_COLUMNS, evaluate, mcnemar, wilson_interval


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0


def test_mcnemar_exact_on_a_hand_made_case():
    # 10 discordant pairs, 9 favour A: p = 2 * P(X <= 1 | n=10, 1/2) = 2 * 11 / 1024
    a = np.array([1] * 9 + [0] + [1] * 5 + [0] * 5, dtype=bool)
    b = np.array([0] * 9 + [1] + [1] * 5 + [0] * 5, dtype=bool)
    result = mcnemar(a, b)
    assert (result.only_a, result.only_b) == (9, 1)
    assert result.p_value == pytest.approx(22 / 1024)
    assert result.significant()
    assert mcnemar(a, a).p_value == 1.0


def test_evaluate_reports_every_column_and_same_targets_for_every_model(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 3, 8, 8, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    specs = [AttackSpec("clean"), AttackSpec("pgd-targeted", eps=0.1, steps=3, seed=4)]
    runs = []
    for seed in (0, 1):
        results = evaluate(small_model(seed), x, y, specs, batch_size=16, targets_dir=tmp_path)
        runs.append(results)
        clean, targeted = results
        row = targeted.row({"run": "r", "arch": "tiny"})
        assert list(row)[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
        assert row["n"] == 40 and row["target_policy"] == "random" and row["passes"] == 3 * 40
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
        assert 0 <= row["target_success"] <= 100 and row["targets_sha256"]
        assert clean.row({})["target_success"] == "" and clean.passes == 0
    assert np.array_equal(runs[0][1].targets, runs[1][1].targets)
    saved = list(tmp_path.glob("targets-4-*.npy"))
    assert len(saved) == 1 and np.array_equal(load_targets(saved[0]).numpy(), runs[0][1].targets)


def test_shipped_suites_parse_and_carry_the_paper_protocol():
    assert {"table9", "strong", "cifar10-linf", "digits"} <= set(list_suites())
    table9 = load_suite("table9")
    pgd = [s for s in table9 if s.name.startswith("pgd")]
    assert {(s.target, round(s.step_size * 255), s.steps) for s in pgd} == {
        ("random", 1, 20), ("none", 1, 20), ("random", 2, 10), ("none", 2, 10)
    }  # fmt: skip
    assert all(s.eps == pytest.approx(16 / 255) for s in pgd)
    assert any(s.name == "autoattack" for s in load_suite("cifar10-linf"))


def test_bad_suite_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[attack]]\nname = "pgd-targeted"\neps = "40/25"\n')
    with pytest.raises(ValueError, match="attack #1"):
        load_suite(bad)
    with pytest.raises(ValueError, match="no attack suite"):
        load_suite("nonexistent")


def test_outcomes_round_trip(tmp_path):
    from robustlr.eval import load_outcomes, save_outcomes

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 8, 8, generator=gen), torch.randint(0, 10, (12,), generator=gen)
    (result,) = evaluate(small_model(), x, y, [AttackSpec("pgd-targeted", eps=0.1, steps=2)])
    row = result.row({"subset_sha256": "abc", "dataset": "digits", "split": "test"})
    path = save_outcomes(tmp_path / "o.npz", result, row)
    back = load_outcomes(path)
    assert np.array_equal(back["correct"], result.correct)
    assert np.array_equal(back["targets"], result.targets)
    assert back["subset_sha256"] == "abc" and back["targets_sha256"] == result.targets_sha256
    assert back["threat"]["attack"] == "pgd-targeted" and back["threat"]["steps"] == "2"


def test_results_do_not_depend_on_batch_size_or_subset():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(20, 3, 8, 8, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    spec = [AttackSpec("pgd-targeted", eps=0.05, steps=2, restarts=2, seed=9)]
    model = small_model()
    (whole,) = evaluate(model, x, y, spec, batch_size=20)
    (small,) = evaluate(model, x, y, spec, batch_size=3)
    (tail,) = evaluate(model, x[8:], y[8:], spec, example_ids=torch.arange(8, 20), batch_size=5)
    assert np.array_equal(whole.correct, small.correct)
    assert np.array_equal(whole.targets, small.targets)
    assert np.array_equal(whole.targets[8:], tail.targets)
    assert np.array_equal(whole.success[8:], tail.success)
