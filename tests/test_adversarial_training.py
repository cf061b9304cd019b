"""The adversarial-training hook: batch layout, targets, BatchNorm state, exact repeatability."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, small_model

from robustlr.train.adversarial import AdversarialHook, AdversarialTraining
from robustlr.train.hooks import StepContext


def ctx(seed: int) -> StepContext:
    return StepContext(
        epoch=0,
        step=0,
        global_step=0,
        device=torch.device("cpu"),
        amp_dtype=None,
        generator=torch.Generator().manual_seed(seed),
        num_classes=10,
    )


@pytest.fixture
def batch():
    return random_batch(8, seed=3)


def test_mixed_batch_is_clean_then_adversarial_and_inside_the_ball(batch):
    x, y = batch
    model = small_model().train()
    bn_mean = model[1].running_mean.clone()
    hook = AdversarialHook(AdversarialTraining(steps=3, mix=0.5))
    batch_out = hook.transform(model, x, y, ctx(0))
    x_train, y_train = batch_out.x, batch_out.y
    assert x_train.shape[0] == 16 and torch.equal(y_train, torch.cat([y, y]))
    assert torch.equal(x_train[:8], x)
    assert (x_train[8:] - x).abs().max() <= 16 / 255 + 1e-6 and x_train.min() >= 0
    assert model.training and torch.equal(model[1].running_mean, bn_mean)
    logits = model(x_train)
    metrics = hook.metrics(logits, batch_out, ctx(0))
    assert set(metrics) == {"clean_acc", "adv_acc", "attack_success"}
    assert metrics["adv_acc"][1] == 8 and metrics["clean_acc"][1] == 8


def test_adversarial_only_batch_and_logit_pairing(batch):
    x, y = batch
    model = small_model()
    only_adv = AdversarialHook(AdversarialTraining(steps=2, mix=0.0)).transform(model, x, y, ctx(0))
    assert only_adv.x.shape[0] == 8 and only_adv.state.n_clean == 0
    hook = AdversarialHook(AdversarialTraining(steps=2, mix=0.5, logit_pairing=2.0))
    mixed = hook.transform(model, x, y, ctx(0))
    logits = model(mixed.x)
    plain = torch.nn.functional.cross_entropy(logits, mixed.y)
    pairing = (logits[:8] - logits[8:]).square().sum(1).mean()
    total = hook.loss(logits, mixed, torch.nn.functional.cross_entropy, ctx(0))
    torch.testing.assert_close(total, plain + 2.0 * pairing)


def test_same_step_generator_gives_the_same_adversarial_batch(batch):
    x, y = batch
    model = small_model()
    settings = AdversarialTraining(steps=2, clean_start_prob=0.5)
    hook = AdversarialHook(settings)
    a = hook.transform(model, x, y, ctx(5)).x
    c = hook.transform(model, x, y, ctx(6)).x
    b = hook.transform(model, x, y, ctx(5)).x  # the hook keeps no state between steps
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert vars(hook) == {"settings": settings}


@pytest.mark.parametrize(
    "kwargs", [{"mix": 1.0}, {"target": "any"}, {"eps": 2.0}, {"logit_pairing": 1.0, "mix": 0.0}]
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        AdversarialTraining(**kwargs)
