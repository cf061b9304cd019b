"""Run robustlr's minimum-norm attacks (registry runner ``minnorm``: FMN, DDN, HopSkipJump)
behind an ``AttackSpec``, and their outcome at the spec's eps.

A minimum-norm attack (registry ``min_norm``) returns, per image, the smallest perturbation
norm it found that makes the model wrong: 0 where the clean image is already wrong, inf where
it found none. The spec's eps is only where its result row reports accuracy: an image counts
as broken at eps when its norm is <= eps.
"""

from __future__ import annotations

import torch
from torch import nn

from robustlr.attacks import ddn, fmn, hopskipjump
from robustlr.attacks.norms import per_example
from robustlr.attacks.pgd import AttackOutcome
from robustlr.attacks.spec import AttackSpec

Tensor = torch.Tensor


def outcome_at_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: AttackSpec,
    best_delta: Tensor,
    best_norm: Tensor,
    passes: int,
) -> AttackOutcome:
    """The outcome of a minimum-norm attack at ``spec.eps``: images whose smallest norm is <=
    eps keep their adversarial image, the others their clean one; ``norms`` holds every
    image's smallest norm (inf: none found).
    Shape: x, best_delta (B, C, H, W), y, best_norm (B,) -> AttackOutcome."""
    broken = best_norm <= spec.eps
    x_adv = torch.where(per_example(broken, x), (x + best_delta).clamp(0, 1), x).detach()
    with torch.no_grad():
        logits = model(x_adv).float()
    return AttackOutcome(
        x_adv=x_adv,
        logits=logits,
        success=logits.argmax(1) != y,
        targets=None,
        passes=passes,
        norms=best_norm.detach(),
    )


def run_min_norm(
    model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, example_ids: Tensor | None
) -> AttackOutcome:
    """Run the minimum-norm attack of ``spec`` (FMN, DDN or HopSkipJump) on a model already
    in attack state; HopSkipJump keys each image's generator by ``example_ids`` (default
    0..B-1). Shape: x (B, C, H, W) on [0, 1], y (B,), example_ids (B,) -> AttackOutcome."""
    family = spec.info.family
    if family == "fmn":
        best_delta, best_norm, passes = fmn.fmn(model, x, y, spec.norm, spec.steps)
    elif family == "ddn":
        best_delta, best_norm, passes = ddn.ddn(model, x, y, spec.steps)
    elif family == "decision":
        ids = torch.arange(len(x)) if example_ids is None else example_ids
        best_delta, best_norm, passes = hopskipjump.hopskipjump(
            model, x, y, spec.norm, spec.queries, spec.seed, ids
        )
    else:
        raise ValueError(f"{spec.name!r} is not a minimum-norm attack")
    return outcome_at_eps(model, x, y, spec, best_delta, best_norm, passes)


def min_norm_settings(spec: AttackSpec) -> str:
    """The exact settings of a minimum-norm attack (the eval row's ``attack_settings``)."""
    family = spec.info.family
    if family == "fmn":
        return fmn.settings(spec.norm, spec.steps)
    if family == "ddn":
        return ddn.settings(spec.steps)
    if family == "decision":
        return hopskipjump.settings(spec.norm, spec.queries, spec.seed)
    raise ValueError(f"{spec.name!r} is not a minimum-norm attack")
