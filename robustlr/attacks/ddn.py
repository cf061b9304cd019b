"""Decoupled direction and norm attack, DDN (Rony et al. 2019), L2: robustlr's own.

Each step ascends the cross-entropy of the true label along its L2-normalised gradient, then
rescales the perturbation onto the sphere of a radius that shrinks by (1 - gamma) while the
point is adversarial and grows by (1 + gamma) while it is not. The step size follows a cosine
schedule. Deterministic: the attack starts at the clean image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustlr.attacks.norms import cosine, keep_smallest, l2_normalised, lp_norm, per_example

Tensor = torch.Tensor

STEP_START = 1.0  # the gradient step (L2 length) at step 0 ...
STEP_END = 0.01  # ... annealed towards this
GAMMA = 0.05  # the radius' relative change per step
RADIUS_START = 1.0  # the first radius


def settings(steps: int) -> str:
    """DDN's exact settings, for the result row's ``attack_settings``."""
    return (
        f"DDN(norm=l2, steps={steps}, step=cosine {STEP_START:g}->{STEP_END:g} "
        f"(L2-normalised CE gradient), gamma={GAMMA:g}, radius_start={RADIUS_START:g}, "
        "start=clean)"
    )


def ddn(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> tuple[Tensor, Tensor, int]:
    """DDN on a model already in attack state (eval mode, frozen parameters).

    Returns each image's smallest adversarial perturbation found, its L2 norm (0: the clean
    image is already wrong; inf: none found) and the forward+backward passes per image.
    Shape: x (B, C, H, W) on [0, 1], y (B,) -> delta (B, C, H, W), norms (B,), int.
    """
    x = x.detach()
    delta = torch.zeros_like(x)
    best_delta = torch.zeros_like(x)
    best_norm = torch.full((len(x),), float("inf"), device=x.device)
    radius = torch.full_like(best_norm, RADIUS_START)
    worst = lp_norm(torch.max(x, 1 - x), "l2")
    for step in range(steps):
        step_size = cosine(STEP_START, STEP_END, step, steps)
        delta.requires_grad_(True)
        logits = model(x + delta).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = delta.detach()
        adversarial = logits.argmax(1) != y
        keep_smallest(best_norm, best_delta, adversarial, delta, "l2")
        radius = (radius * torch.where(adversarial, 1 - GAMMA, 1 + GAMMA)).clamp(max=worst)
        delta = delta + step_size * l2_normalised(grad)
        delta = delta * per_example(radius / lp_norm(delta, "l2").clamp_min(1e-12), delta)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():  # the last step's point
        adversarial = model(x + delta).float().argmax(1) != y
    keep_smallest(best_norm, best_delta, adversarial, delta, "l2")
    return best_delta, best_norm, steps + 1
