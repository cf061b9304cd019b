"""Projected gradient descent (Madry et al.) and FGSM, L-inf and L2, targeted or not.

Targeted attacks descend the cross-entropy of the target class and succeed only when the model
predicts the target; untargeted attacks ascend the cross-entropy of the true label and succeed
when the prediction is wrong. Restarts are merged per example as the worst case: a successful
restart beats a failed one; then (targeted attacks) a misclassifying restart beats one the model
gets right, so an image any restart misclassified stays misclassified and accuracy never rises
with restarts; then the higher objective wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustlr.attacks.modes import autocast_for
from robustlr.attacks.spec import AttackSpec
from robustlr.attacks.threat import threat_model

Tensor = torch.Tensor


@dataclass
class AttackOutcome:
    """Adversarial images and per-example results of one attack on one batch."""

    x_adv: Tensor  # (B, C, H, W) on [0, 1], inside the eps ball
    logits: Tensor  # (B, K) fp32 logits at x_adv
    success: Tensor  # (B,) bool: wrong (untargeted) or target predicted (targeted)
    targets: Tensor | None  # (B,) targets of a targeted attack
    passes: int  # forward+backward passes spent
    zero_grad_fraction: float = 0.0  # share of examples whose first input gradient was all zero
    norms: Tensor | None = None  # (B,) a minimum-norm attack's smallest adversarial norm found


def _objective(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """Per-example quantity the attack maximises. Shape: (B, K), (B,) -> (B,)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return -ce if targeted else ce


def _succeeded(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    pred = logits.argmax(dim=1)
    return pred == targets if targets is not None else pred != y


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: AttackSpec,
    targets: Tensor | None = None,
    start: Tensor | None = None,
    example_ids: Tensor | None = None,
) -> AttackOutcome:
    """Run PGD (FGSM when ``spec.name == 'fgsm'``) on a model already in attack state.

    ``targets`` are required for a targeted spec; the caller (``robustlr.attacks.run``) draws
    them. ``start``, if given, replaces the first restart's starting point (it is projected
    into the ball). With ``example_ids`` (e.g. dataset indices) every random start is drawn
    from a generator keyed by (seed, restart, id), so results do not depend on how images are
    batched or sharded across processes; without them one generator seeded by ``spec.seed``
    serves the batch. Shape: x (B, C, H, W) on [0, 1], y (B,), example_ids (B,) -> AttackOutcome.
    """
    if spec.targeted and targets is None:
        raise ValueError(f"{spec.describe()} is targeted: pass targets")
    labels = targets if spec.targeted else y
    ball = threat_model(spec.norm, spec.eps)
    generator = torch.Generator().manual_seed(spec.seed)
    random_start = spec.random_start and spec.info.family != "fgsm"
    step_size = spec.resolved_step_size
    x = x.detach()
    best_x = x.clone()
    best_success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_wrong = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_obj = torch.full((len(x),), float("-inf"), device=x.device)
    best_logits = None
    zero_grads = 0
    for restart in range(spec.restarts):
        if restart == 0 and start is not None:
            x_adv = ball.project(start.detach().to(x.dtype), x)
        else:
            x_adv = (
                _random_start(ball, x, spec.seed, restart, example_ids, generator)
                if random_start
                else x.clone()
            )
        for step in range(spec.steps):
            x_adv.requires_grad_(True)
            with autocast_for(spec.precision, x.device):
                logits = model(x_adv)
            loss = _objective(logits, labels, spec.targeted).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            if restart == 0 and step == 0:
                zero_grads = int((grad.flatten(1).abs().amax(1) == 0).sum())
            x_adv = ball.project(ball.step(x_adv.detach(), grad, step_size), x)
        with torch.no_grad():
            logits = model(x_adv).float()
        success = _succeeded(logits, y, labels if spec.targeted else None)
        wrong = logits.argmax(1) != y
        obj = _objective(logits, labels, spec.targeted)
        tie = success == best_success
        better = (
            (success & ~best_success)
            | (tie & wrong & ~best_wrong)
            | (tie & (wrong == best_wrong) & (obj > best_obj))
        )
        best_x[better] = x_adv[better]
        best_logits = (
            logits if best_logits is None else torch.where(better[:, None], logits, best_logits)
        )
        best_success |= success
        best_wrong |= wrong
        best_obj = torch.where(better, obj, best_obj)
    return AttackOutcome(
        x_adv=best_x,
        logits=best_logits,
        success=best_success,
        targets=targets if spec.targeted else None,
        passes=spec.steps * spec.restarts,
        zero_grad_fraction=zero_grads / max(len(x), 1),
    )


MASK64 = 2**64 - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that mixes every bit."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & MASK64
    return value ^ (value >> 31)


def example_seed(seed: int, restart: int, example_id: int) -> int:
    """A 63-bit generator seed for one example's random start. For one (seed, restart) it is
    an offset of the example id, so distinct ids (below 2**63) always get distinct seeds."""
    base = _splitmix64((seed * 0x9E3779B97F4A7C15 + restart * 0xD1B54A32D192ED03) & MASK64)
    return (base + example_id) & (2**63 - 1)


def _random_start(
    ball, x: Tensor, seed: int, restart: int, example_ids: Tensor | None, generator
) -> Tensor:
    if example_ids is None:
        return ball.init(x, generator)
    starts = [
        ball.init(x[i : i + 1], torch.Generator().manual_seed(example_seed(seed, restart, int(j))))
        for i, j in enumerate(example_ids.tolist())
    ]
    return torch.cat(starts)
