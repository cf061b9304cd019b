"""Fast minimum-norm attack, FMN (Pintor et al. 2021), in L-inf, L2 and L1: robustlr's own.

Each step descends the logit margin (true-class logit minus the best other) along its
L2-normalised gradient, then projects onto an L-p ball whose radius adapts: until an
adversarial point is found it is the current norm plus a linear estimate of the distance to the
boundary (|margin| / dual norm of the gradient); afterwards it shrinks by (1 - gamma) while the
point is adversarial (never above the smallest adversarial norm so far) and grows by
(1 + gamma) while it is not. Step size and gamma follow cosine schedules. Deterministic: the
attack starts at the clean image.

L2 and L1 depart from the paper's rule in two ways (L-inf keeps it, and matches foolbox). The
clamp to [0, 1] after the projection removes the components that push a pixel past its bound,
which shrinks an L2 or L1 norm (an L-inf norm keeps its largest component), while the dual norm
counted them: the radius, reset to the clamped norm plus the estimate, then creeps towards the
boundary without crossing it (a linear digits model kept every image). So the gradient drops
the pixels the box blocks (at 0 and descent would lower them, at 1 and it would raise them)
before the estimate and the step. And the estimate of a locally linear boundary lands exactly on
it (a tie the true class wins), so until an adversarial point is found the radius adds
(1 + gamma) times the estimate; the shrinking phase then brings it back towards the minimum.
"""

from __future__ import annotations

import torch
from torch import nn

from robustlr.attacks.norms import (
    DUAL,
    cosine,
    keep_smallest,
    l2_normalised,
    lp_norm,
    project_ball,
)

Tensor = torch.Tensor

STEP_START = 1.0  # the gradient step (L2 length) at step 0 ...
STEP_END = STEP_START / 100  # ... annealed towards this
GAMMA_START = 0.05  # the radius' relative change at step 0 ...
GAMMA_END = 0.001  # ... annealed towards this


def settings(norm: str, steps: int) -> str:
    """FMN's exact settings, for the result row's ``attack_settings``."""
    box = "" if norm == "linf" else ", box-blocked pixels dropped, boundary estimate x(1+gamma)"
    return (
        f"FMN(norm={norm}, steps={steps}, step=cosine {STEP_START:g}->{STEP_END:g} "
        f"(L2-normalised margin gradient{box}), gamma=cosine {GAMMA_START:g}->{GAMMA_END:g}, "
        "start=clean)"
    )


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """True-class logit minus the largest other logit (< 0: misclassified).
    Shape: (B, K), (B,) -> (B,)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(1)


def _free(grad: Tensor, point: Tensor) -> Tensor:
    """The margin gradient without the pixels the box [0, 1] blocks: a pixel at 0 that descent
    (-grad) would lower, or at 1 that it would raise. Shape: like grad."""
    blocked = ((point <= 0) & (grad > 0)) | ((point >= 1) & (grad < 0))
    return grad.masked_fill(blocked, 0)


def fmn(
    model: nn.Module, x: Tensor, y: Tensor, norm: str, steps: int
) -> tuple[Tensor, Tensor, int]:
    """FMN on a model already in attack state (eval mode, frozen parameters).

    Returns each image's smallest adversarial perturbation found, its ``norm`` (0: the clean
    image is already wrong; inf: none found) and the forward+backward passes per image.
    Shape: x (B, C, H, W) on [0, 1], y (B,) -> delta (B, C, H, W), norms (B,), int.
    """
    x = x.detach()
    delta = torch.zeros_like(x)
    best_delta = torch.zeros_like(x)
    best_norm = torch.full((len(x),), float("inf"), device=x.device)
    radius = torch.full_like(best_norm, float("inf"))
    worst = lp_norm(torch.max(x, 1 - x), norm)  # the farthest point of the box
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for step in range(steps):
        step_size = cosine(STEP_START, STEP_END, step, steps)
        gamma = cosine(GAMMA_START, GAMMA_END, step, steps)
        delta.requires_grad_(True)
        logits = model(x + delta).float()
        margin = _margin(logits, y)
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        delta = delta.detach()
        aim = 1.0  # L-inf: the paper's rule (matches foolbox)
        if norm != "linf":  # L2, L1: the clamp would shrink the norm; aim past the boundary
            grad, aim = _free(grad, x + delta), 1 + gamma
        adversarial = logits.argmax(1) != y
        keep_smallest(best_norm, best_delta, adversarial, delta, norm)
        found |= adversarial
        size = lp_norm(delta, norm)
        to_boundary = margin.detach().abs() / lp_norm(grad, DUAL[norm]).clamp_min(1e-12)
        radius = torch.where(
            adversarial,
            torch.min(radius * (1 - gamma), best_norm),
            torch.where(found, radius * (1 + gamma), size + aim * to_boundary),
        ).clamp(max=worst)
        delta = delta - step_size * l2_normalised(grad)
        delta = project_ball(delta, norm, radius)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():  # the last step's point
        adversarial = model(x + delta).float().argmax(1) != y
    keep_smallest(best_norm, best_delta, adversarial, delta, norm)
    return best_delta, best_norm, steps + 1
