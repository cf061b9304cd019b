"""Attack invariants: the eps ball, [0, 1], targets, restored model state, determinism."""

from __future__ import annotations

import pytest
import torch
from helpers import small_model

from robustlr.attacks import (
    AttackSpec,
    attack,
    draw_random_targets,
    load_targets,
    parse_eps,
    run_attack,
    save_targets,
    targets_sha256,
)


def _assert_inside(x_adv, x, spec):
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if spec.norm == "linf":
        assert (x_adv - x).abs().max() <= spec.eps + 1e-6
    else:
        assert (x_adv - x).flatten(1).norm(dim=1).max() <= spec.eps + 1e-5


OWN = [
    AttackSpec("pgd-untargeted", eps=8 / 255, steps=5),
    AttackSpec("pgd-targeted", eps=16 / 255, steps=5, step_size=2 / 255),
    AttackSpec("pgd-least-likely", eps=0.1, steps=3),
    AttackSpec("fgsm", eps=0.05),
    AttackSpec("pgd-untargeted", norm="l2", eps=0.5, steps=5, restarts=2),
    AttackSpec("pgd", target="random", norm="l2", eps=1.0, steps=4),
]


@pytest.mark.parametrize("spec", OWN, ids=lambda s: s.describe())
def test_own_attacks_stay_inside_the_ball_and_the_box(spec, batch):
    x, y = batch
    _assert_inside(attack(small_model(), x, y, spec), x, spec)


TORCHATTACKS = [
    AttackSpec("apgd-ce", eps=8 / 255, steps=3),
    AttackSpec("apgd-t", eps=8 / 255, steps=3),
    AttackSpec("fab", eps=8 / 255, steps=3),
    AttackSpec("square", eps=8 / 255, queries=20),
    AttackSpec("cw", norm="l2", eps=0.5, steps=5),
]


@pytest.mark.parametrize("spec", TORCHATTACKS, ids=lambda s: s.name)
def test_torchattacks_adapters_stay_inside_and_report_honestly(spec, batch):
    x, y = batch
    model = small_model()
    outcome = run_attack(model, x, y, spec)
    _assert_inside(outcome.x_adv, x, spec)
    model.eval()
    with torch.no_grad():
        assert torch.equal(outcome.success, model(outcome.x_adv).argmax(1) != y)


def test_targeted_attack_aims_at_the_chosen_wrong_class(batch):
    x, y = batch
    model = small_model()
    spec = AttackSpec("pgd-targeted", eps=0.5, step_size=0.05, steps=20)
    targets = draw_random_targets(y, 10, seed=3)
    outcome = run_attack(model, x, y, spec, targets=targets)
    assert torch.equal(outcome.targets, targets)
    model.eval()
    with torch.no_grad():
        pred = model(outcome.x_adv).argmax(1)
    # success means predicting the target, not merely being wrong
    assert torch.equal(outcome.success, pred == targets)
    assert outcome.success.float().mean() > 0.5, "a strong targeted attack reaches its targets"


def test_untargeted_success_means_wrong_prediction(batch):
    x, y = batch
    model = small_model()
    outcome = run_attack(model, x, y, AttackSpec("pgd-untargeted", eps=0.3, steps=10))
    model.eval()
    with torch.no_grad():
        assert torch.equal(outcome.success, model(outcome.x_adv).argmax(1) != y)
    assert outcome.success.float().mean() > 0.5


def test_model_state_is_restored_and_untouched(batch):
    x, y = batch
    model = small_model()
    model.train()
    model[3].eval()  # a submodule in another mode must get its own mode back
    model[5].weight.requires_grad_(False)
    bn_before = model[1].running_mean.clone()
    attack(model, x, y, AttackSpec("pgd-targeted", eps=8 / 255, steps=3))
    assert model.training and model[1].training and not model[3].training
    assert torch.equal(model[1].running_mean, bn_before), "BatchNorm ran in eval mode"
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True]
    assert all(p.grad is None for p in model.parameters())


def test_same_seed_same_result_and_seed_matters(batch):
    x, y = batch
    model = small_model()
    spec = AttackSpec("pgd-targeted", eps=8 / 255, steps=3, seed=7)
    first, again = attack(model, x, y, spec), attack(model, x, y, spec)
    assert torch.equal(first, again)
    assert not torch.equal(first, attack(model, x, y, spec.with_options(seed=8)))


def test_restarts_never_lose_a_success(batch):
    x, y = batch
    model = small_model()
    one = run_attack(model, x, y, AttackSpec("pgd-untargeted", eps=4 / 255, steps=3, seed=1))
    three = run_attack(
        model, x, y, AttackSpec("pgd-untargeted", eps=4 / 255, steps=3, seed=1, restarts=3)
    )
    assert bool((three.success | ~one.success).all())
    assert three.passes == 3 * one.passes


def test_zero_eps_returns_the_clean_images(batch):
    x, y = batch
    assert torch.equal(attack(small_model(), x, y, AttackSpec("pgd-untargeted", eps=0.0)), x)


def test_bf16_attack_runs_and_stays_inside(batch):
    x, y = batch
    spec = AttackSpec("pgd-untargeted", eps=8 / 255, steps=2, precision="bf16")
    _assert_inside(attack(small_model(), x, y, spec), x, spec)


def test_random_targets_are_wrong_seeded_and_prefix_stable(tmp_path):
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    t = draw_random_targets(labels, 10, seed=5)
    assert not bool((t == labels).any()) and t.min() >= 0 and t.max() <= 9
    assert torch.equal(t, draw_random_targets(labels, 10, seed=5))
    assert torch.equal(t[:100], draw_random_targets(labels[:100], 10, seed=5))
    assert not torch.equal(t, draw_random_targets(labels, 10, seed=6))
    assert len(set(t.tolist())) == 10
    sha = save_targets(tmp_path / "targets.npy", t)
    assert sha == targets_sha256(load_targets(tmp_path / "targets.npy")) == targets_sha256(t)


def test_inputs_outside_the_unit_box_are_refused(batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(small_model(), x * 2, y, AttackSpec("fgsm", eps=0.1))


@pytest.mark.parametrize(
    ("text", "value"), [("16/255", 16 / 255), ("0.0627", 0.0627), ("1", 1.0), (" 8/255 ", 8 / 255)]
)
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1.5", "-0.1", "300/255", "abc", "1/0"])
def test_parse_eps_rejects_bad_values(text):
    with pytest.raises(ValueError):
        parse_eps(text)


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown attack"):
        AttackSpec("deepfool")
    with pytest.raises(ValueError, match="implies target policy"):
        AttackSpec("pgd-untargeted", target="random")
    with pytest.raises(ValueError, match="outside"):
        AttackSpec("pgd-untargeted", eps=2.0)
    spec = AttackSpec.from_dict(
        {"name": "pgd-targeted", "eps": "16/255", "step_size": "1/255", "steps": 20}
    )
    assert spec.targeted and spec.step_size == pytest.approx(1 / 255) and spec.target == "random"
    assert AttackSpec("fgsm", eps=0.1).steps == 1


def test_least_likely_targets_are_the_lowest_wrong_class():
    from robustlr.attacks.targets import least_likely_targets

    logits = torch.tensor([[0.0, 5.0, -1.0], [-3.0, 1.0, 2.0], [1.0, 0.0, 2.0]])
    labels = torch.tensor([1, 0, 1])  # row 2: the true class is the least likely; skip it
    assert least_likely_targets(logits, labels).tolist() == [2, 1, 0]


def test_start_point_replaces_the_first_random_start(batch):
    x, y = batch
    model = small_model()
    spec = AttackSpec("pgd-untargeted", eps=8 / 255, steps=1, step_size=0.0)
    start = (x + 1.0).clamp(0, 1)  # projected back into the ball: x + eps where possible
    adv = run_attack(model, x, y, spec, start=start).x_adv
    torch.testing.assert_close(adv, torch.min(x + 8 / 255, torch.ones_like(x)))


@pytest.mark.parametrize(
    ("spec", "given_targets", "forwards"),
    [
        # PGD with its targets given (adversarial training, evaluation): steps + 1 final forward,
        # no clean forward
        (AttackSpec("pgd-targeted", eps=0.1, steps=3), True, 4),
        # random targets drawn here need the class count: one clean forward more
        (AttackSpec("pgd-targeted", eps=0.1, steps=3), False, 5),
        (AttackSpec("pgd-least-likely", eps=0.1, steps=3), False, 5),
        (AttackSpec("clean"), False, 1),
    ],
    ids=["pgd-given-targets", "pgd-drawn-targets", "least-likely", "clean"],
)
def test_the_clean_forward_runs_only_when_read(batch, spec, given_targets, forwards):
    x, y = batch
    model = small_model()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    targets = draw_random_targets(y, 10, seed=3) if given_targets else None
    run_attack(model, x, y, spec, targets=targets)
    assert len(calls) == forwards
