"""Per-example L-p norms, ball projections and step schedules for robustlr's own
minimum-norm attacks (FMN, DDN, HopSkipJump)."""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}


def lp_norm(t: Tensor, norm: str) -> Tensor:
    """Per-example norm ('linf', 'l2' or 'l1'). Shape: (B, ...) -> (B,)."""
    flat = t.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "l1":
        return flat.abs().sum(1)
    raise ValueError(f"unknown norm {norm!r}")


def per_example(v: Tensor, like: Tensor) -> Tensor:
    """A (B,) tensor shaped to broadcast against ``like``. Shape: (B,) -> (B, 1, ..., 1)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def l2_normalised(t: Tensor) -> Tensor:
    """Each example divided by its L2 norm (zero stays zero). Shape: like t."""
    return t / per_example(lp_norm(t, "l2").clamp_min(1e-12), t)


def project_l1(delta: Tensor, radius: Tensor) -> Tensor:
    """Euclidean projection of each example onto the L1 ball of its radius (Duchi et al.
    2008: soft threshold at the level that leaves exactly the radius).
    Shape: delta (B, ...), radius (B,) -> like delta."""
    flat = delta.flatten(1)
    size = flat.abs()
    inside = size.sum(1) <= radius
    ranked = size.sort(1, descending=True).values
    cumulative = ranked.cumsum(1)
    k = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    finite = torch.where(inside, torch.zeros_like(radius), radius)
    active = (ranked * k > cumulative - finite[:, None]).sum(1).clamp_min(1)
    theta = (cumulative.gather(1, (active - 1)[:, None]).squeeze(1) - finite) / active
    shrunk = flat.sign() * (size - theta[:, None]).clamp_min(0)
    return torch.where(inside[:, None], flat, shrunk).view_as(delta)


def project_ball(delta: Tensor, norm: str, radius: Tensor) -> Tensor:
    """Each example projected onto the ``norm`` ball of its radius (inf: unchanged).
    Shape: delta (B, ...), radius (B,) -> like delta."""
    if norm == "linf":
        r = per_example(radius, delta)
        return torch.max(torch.min(delta, r), -r)
    if norm == "l2":
        scale = (radius / lp_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
        return delta * per_example(scale, delta)
    if norm == "l1":
        return project_l1(delta, radius)
    raise ValueError(f"unknown norm {norm!r}")


def cosine(start: float, end: float, step: int, steps: int) -> float:
    """Cosine annealing from ``start`` (step 0) towards ``end`` (step ``steps``)."""
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def keep_smallest(
    best_norm: Tensor, best_delta: Tensor, adversarial: Tensor, delta: Tensor, norm: str
) -> None:
    """Where ``delta`` is adversarial and smaller than the best so far, it becomes the best
    (in place). Shape: best_norm (B,), best_delta and delta (B, ...), adversarial (B,)."""
    size = lp_norm(delta, norm)
    better = adversarial & (size < best_norm)
    best_norm[better] = size[better]
    best_delta[better] = delta[better]
