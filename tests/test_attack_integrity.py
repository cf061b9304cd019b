"""Attack and evaluation integrity: the attack registry (every attack name), outcome files tied
to their rows, derived step sizes, worst-case restarts, per-example seeds, generator devices,
the torchattacks adapters' settings, and the APGD-CE reference column and check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import row, small_model, write_run

from robustlr.attacks import AttackSpec, run_attack
from robustlr.attacks.adapters import TORCHATTACKS_NAMES, attack_settings, build_torchattack
from robustlr.attacks.registry import ATTACK_NAMES, ATTACKS, names_where
from robustlr.attacks.run import RUNNERS, bounded_outcome
from robustlr.attacks.threat import L2Ball, LinfBall
from robustlr.cli.errors import UsageFailure
from robustlr.cli.eval import build_specs
from robustlr.eval.runner import evaluate
from robustlr.report import build_table9, collect_results, pair_table, run_checks
from robustlr.report.checks import check_coverage, check_pgd_vs_apgd, checks_for
from robustlr.report.writers import rich_table_data, to_markdown
from robustlr.train.adversarial import AdversarialHook, AdversarialTraining
from robustlr.train.hooks import StepContext

# --- the registry: every attack name ------------------------------------------------------


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_runs_from_its_small_spec(name, batch):
    info = ATTACKS[name]
    assert info.runner in RUNNERS
    spec = AttackSpec.example(name)
    x, y = batch
    model = small_model()
    model.train()
    outcome = run_attack(model, x, y, spec)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert outcome.x_adv.min() >= 0 and outcome.x_adv.max() <= 1
    delta = (outcome.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if spec.norm == "linf" else delta.norm(dim=1)
    assert size.max() <= (spec.eps if info.family != "clean" else 0.0) + 1e-5
    model.eval()
    with torch.no_grad():
        pred = model(outcome.x_adv).argmax(1)
    assert torch.equal(outcome.logits.argmax(1), pred)
    if not spec.targeted:
        assert torch.equal(outcome.success, pred != y)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_has_an_honest_row_and_is_checked_or_named(name, batch):
    info = ATTACKS[name]
    x, y = batch
    (result,) = evaluate(small_model(), x[:4], y[:4], [AttackSpec.example(name)])
    out = result.row({})
    assert (out["step_size"] != "") == info.takes_step_size
    assert (out["attack_settings"] != "") == (info.runner in ("torchattacks", "minnorm"))
    frame = pd.DataFrame([out | {"subset_sha256": "s", "run": "r"}])
    from robustlr.report.results import normalise_results

    frame = normalise_results(frame, source="t", run_key="r")
    named = check_coverage(frame)
    if name == "clean":
        assert not named
    else:  # examined by a check, or named as examined by none: never silently dropped
        assert bool(checks_for(name)) != bool(named)


def test_registry_families_drive_the_checks():
    pgd = names_where(family="pgd")
    assert set(pgd) == {"pgd", "pgd-untargeted", "pgd-targeted", "pgd-least-likely"}
    assert "square" in names_where(white_box=False)
    assert set(TORCHATTACKS_NAMES) == set(names_where(runner="torchattacks"))
    for name in pgd:
        assert {"more_steps", "eps_sweep", "untargeted_le_targeted"} <= set(checks_for(name))


def test_options_an_attack_does_not_take_are_refused_or_skipped():
    with pytest.raises(ValueError, match="without step size"):
        AttackSpec("apgd-ce", step_size=1 / 255)
    with pytest.raises(ValueError, match="fp32 only"):
        AttackSpec("square", precision="bf16")
    spec = AttackSpec("apgd-ce", steps=100).with_options(step_size=1 / 255, precision="bf16")
    assert spec.step_size is None and spec.precision == "fp32"
    with pytest.raises(UsageFailure, match="--step-size is not used by apgd-ce"):
        build_specs(("apgd-ce",), None, {"step_size": 1 / 255})


# --- defect 6: draws on the generator's device ---------------------------------------------


@pytest.mark.parametrize("ball", [LinfBall(0.1), L2Ball(0.5)], ids=["linf", "l2"])
def test_ball_init_draws_on_the_generator_and_lands_on_x_device(ball):
    x = torch.rand(2, 3, 4, 4, device="meta")  # another device than the generator's (CPU)
    start = ball.init(x, torch.Generator().manual_seed(0))
    assert start.device.type == "meta" and start.shape == x.shape


def test_adversarial_hook_draws_every_tensor_on_the_generator_device(monkeypatch):
    """PyTorch refuses a CUDA generator filling a CPU tensor; without a GPU, check that every
    draw from the step generator names the generator's device."""
    seen = []

    def strict(fn):
        def draw(*args, generator=None, device=None, **kwargs):
            if generator is not None:
                seen.append(device)
                assert device is not None and torch.device(device) == generator.device, (
                    f"{fn.__name__} drew from a generator without its device"
                )
            return fn(*args, generator=generator, device=device, **kwargs)

        return draw

    for name in ("rand", "randint", "randn"):
        monkeypatch.setattr(torch, name, strict(getattr(torch, name)))
    gen = torch.Generator().manual_seed(0)
    ctx = StepContext(0, 0, 0, torch.device("cpu"), None, gen, num_classes=10)
    x, y = torch.full((4, 3, 8, 8), 0.5), torch.arange(4)
    settings = AdversarialTraining(steps=1, clean_start_prob=0.5)
    AdversarialHook(settings).transform(small_model().train(), x, y, ctx)
    assert len(seen) >= 4  # seed, target shifts, clean-start coin, random start


# --- the torchattacks adapters ------------------------------------------------------------


def _members(name: str, num_classes: int = 10) -> list:
    """The torchattacks objects an ensemble runs, in order (what the adapter builds)."""
    return build_torchattack(small_model(), AttackSpec(name, eps=8 / 255), num_classes).attacks


def test_autoattack_is_named_honestly_and_standard_has_the_original_settings():
    # the original AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square; 100
    # iterations, 9 target classes, 5000 queries with p_init 0.8 and no schedule rescaling
    standard = _members("autoattack")
    assert [type(a).__name__ for a in standard] == ["APGD", "APGDT", "FAB", "Square"]
    apgd, apgdt, fab, square = standard
    assert apgd.loss == "ce" and fab.multi_targeted
    assert apgd.steps == apgdt.steps == fab.steps == 100
    assert apgdt.n_target_classes == fab.n_target_classes == 9
    assert (square.n_queries, square.p_init, square.rescale_schedule) == (5000, 0.8, False)
    assert all(a.n_restarts == 1 and a.eps == 8 / 255 for a in standard)
    # fewer classes: every wrong class is a target
    assert [a.n_target_classes for a in _members("autoattack", 5)[1:3]] == [4, 4]
    # torchattacks' reduced ensemble: 10-step members, Square's rescaled schedule
    fast = _members("autoattack-fast")
    assert [a.steps for a in fast[:3]] == [10, 10, 10] and fast[3].rescale_schedule
    # the recorded settings name every member, in order
    recorded = attack_settings(AttackSpec("autoattack", eps=8 / 255), 10)
    assert [part.split("(")[0] for part in recorded.split(" + ")] == [
        "APGD",
        "APGDT",
        "FAB",
        "Square",
    ]


def test_unbounded_attack_examples_outside_the_ball_count_as_failures(batch):
    x, y = batch
    spec = AttackSpec("cw", norm="l2", eps=0.5)
    far = (x + 0.5).clamp(0, 1)  # L2 distance >> 0.5
    out = bounded_outcome(small_model(), x, y, spec, far)
    assert torch.equal(out.x_adv, x)


def test_torchattacks_leaves_the_global_rng_alone(batch):
    x, y = batch
    model = small_model()  # (seeds the global RNG itself)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_attack(model, x, y, AttackSpec("apgd-ce", eps=8 / 255, steps=2, seed=7))
    assert torch.equal(torch.rand(3), expected)


# --- the protocol: APGD-CE beside Table 9 --------------------------------------------------


def test_apgd_column_and_optimism_check(tmp_path):
    root = tmp_path / "runs"
    apgd = {"step_size": "", "zero_grad_fraction": ""}
    write_run(root, "resnet26-adv", "resnet26", "adversarial", [
        row("clean", 80.0), row("pgd-targeted", 70.0), row("pgd-untargeted", 66.9),
        row("apgd-ce", 61.0, steps=100, **apgd),
    ])  # fmt: skip
    write_run(root, "resnet26-regular", "resnet26", "regular", [
        row("clean", 95.0), row("pgd-untargeted", 2.0), row("apgd-ce", 1.0, steps=100, **apgd),
    ])  # fmt: skip
    table = build_table9(collect_results(runs_dir=root))
    frame = table.frame.set_index("network")
    assert frame.loc["resnet26", "adv_apgd_ce"] == 61.0
    assert frame.loc["resnet26", "regular_apgd_ce"] == 1.0
    verdicts = {c.subject: c.status for c in check_pgd_vs_apgd(table)}
    assert verdicts == {"resnet26 (adversarial)": "warn", "resnet26 (regular)": "pass"}
    checks = run_checks(table.results, table)
    assert any(c.check == "pgd_not_optimistic" and c.status == "warn" for c in checks)
    md = to_markdown(table, pair_table(table), checks)
    assert "## Stronger attacks beside Table 9" in md and "61.0 [" in md
    assert "pgd_not_optimistic" in md
    assert np.isnan(frame.loc["resnet26", "adv_autoattack"])
    terminal = rich_table_data(table)
    assert "adv_apgd_ce" in terminal["columns"] and "adv_autoattack" not in terminal["columns"]


def test_old_autoattack_rows_are_read_as_the_reduced_ensemble():
    from robustlr.report.results import normalise_results

    old = row("autoattack", 40.0, step_size="")
    new = row("autoattack", 35.0, step_size="", attack_settings="APGD(steps=100) + ...")
    frame = normalise_results(pd.DataFrame([old, new]), source="t", run_key="r")
    assert list(frame["attack"]) == ["autoattack-fast", "autoattack"]
