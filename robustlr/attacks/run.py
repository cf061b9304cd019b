"""Run any attack of an ``AttackSpec`` on a batch: the one entry point of robustlr.attacks."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from robustlr.attacks.adapters import attack_settings, torchattacks_adversarial
from robustlr.attacks.minnorm import min_norm_settings, run_min_norm
from robustlr.attacks.modes import eval_mode, frozen_parameters
from robustlr.attacks.pgd import AttackOutcome, pgd
from robustlr.attacks.spec import AttackSpec
from robustlr.attacks.targets import draw_random_targets, least_likely_targets
from robustlr.attacks.threat import threat_model

Tensor = torch.Tensor


def _check_images(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or y.shape != x.shape[:1]:
        raise ValueError(
            f"expected images (B, ...) and labels (B,), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("attacks work on images in [0, 1]; normalise inside the model")


def run_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: AttackSpec,
    targets: Tensor | None = None,
    start: Tensor | None = None,
    example_ids: Tensor | None = None,
) -> AttackOutcome:
    """Attack a batch and report per-example success.

    The model runs in eval mode with frozen parameters during the attack; its train/eval flags
    and ``requires_grad`` flags are restored afterwards. Random targets, when not given, are
    drawn from ``spec.seed`` for this batch (evaluation draws them once for the whole set).
    ``start`` sets PGD's first starting point and ``example_ids`` key its random starts per
    example (see ``pgd``).
    Shape: x (B, C, H, W) on [0, 1], y (B,), targets (B,) -> AttackOutcome.
    """
    _check_images(x, y)
    x, y = x.detach(), y.to(x.device)
    with eval_mode(model), frozen_parameters(model):

        @cache
        def clean_logits() -> Tensor:  # one forward, only for the attacks that read it
            with torch.no_grad():
                return model(x).float()

        if spec.target == "random" and targets is None:
            targets = draw_random_targets(y, clean_logits().shape[1], spec.seed)
        elif spec.target == "least-likely":
            targets = least_likely_targets(clean_logits(), y)
        if targets is not None:
            targets = targets.to(x.device)
            if spec.targeted and bool((targets == y).any()):
                raise ValueError("a target equals the true label: targets must be wrong classes")
        return RUNNERS[spec.info.runner](
            model, x, y, spec, clean_logits, targets, start, example_ids
        )


CleanLogits = Callable[[], Tensor]


def _clean(
    model, x, y, spec, clean_logits: CleanLogits, targets, start, example_ids
) -> AttackOutcome:
    logits = clean_logits()
    return AttackOutcome(
        x_adv=x, logits=logits, success=logits.argmax(1) != y, targets=None, passes=0
    )


def _own(
    model, x, y, spec, clean_logits: CleanLogits, targets, start, example_ids
) -> AttackOutcome:
    return pgd(model, x, y, spec, targets, start, example_ids)


def _torchattacks(
    model, x, y, spec, clean_logits: CleanLogits, targets, start, example_ids
) -> AttackOutcome:
    raw = torchattacks_adversarial(model, x, y, spec, clean_logits().shape[1])
    return bounded_outcome(model, x, y, spec, raw)


def bounded_outcome(
    model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, x_adv: Tensor
) -> AttackOutcome:
    """The outcome of adversarial images from an outside attack, held to the threat model:
    an unbounded attack's (CW) examples that leave the eps ball count as failures (the clean
    image is kept for them); the rest are projected onto the ball (rounding only).
    Shape: x, x_adv (B, C, H, W), y (B,) -> AttackOutcome."""
    ball = threat_model(spec.norm, spec.eps)
    x_adv = x_adv.detach().to(x.dtype)
    if not spec.info.bounded:
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if spec.norm == "linf" else delta.norm(dim=1)
        outside = size > spec.eps * (1 + 1e-5) + 1e-6
        x_adv = torch.where(outside.view(-1, *([1] * (x.dim() - 1))), x, x_adv)
    x_adv = ball.project(x_adv, x)
    with torch.no_grad():
        logits = model(x_adv).float()
    return AttackOutcome(
        x_adv=x_adv,
        logits=logits,
        success=logits.argmax(1) != y,
        targets=None,
        passes=-1,  # torchattacks does not report its passes
    )


def _min_norm(
    model, x, y, spec, clean_logits: CleanLogits, targets, start, example_ids
) -> AttackOutcome:
    return run_min_norm(model, x, y, spec, example_ids)


# how each registry ``runner`` runs (tests check that every runner has one)
RUNNERS = {
    "clean": _clean,
    "pgd": _own,
    "torchattacks": _torchattacks,
    "minnorm": _min_norm,
}


def settings_of(spec: AttackSpec, num_classes: int) -> str:
    """The exact settings an attack runs with beyond its spec's columns (the result row's
    ``attack_settings``): torchattacks' and the minimum-norm attacks'; "" for the others."""
    if spec.info.runner == "torchattacks":
        return attack_settings(spec, num_classes)
    if spec.info.runner == "minnorm":
        return min_norm_settings(spec)
    return ""


def attack(
    model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, targets: Tensor | None = None
) -> Tensor:
    """Adversarial images for ``spec`` (see ``run_attack``).

    Shape: x (B, C, H, W) on [0, 1], y (B,) -> (B, C, H, W) on [0, 1].
    """
    return run_attack(model, x, y, spec, targets).x_adv
