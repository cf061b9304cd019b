"""Learning-rate schedules per optimiser step: linear warm-up, then step decay or cosine."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(
    step: int,
    steps_per_epoch: int,
    total_epochs: int,
    warmup_epochs: float = 0.0,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup_epochs`` epochs; then "step" divides by 1/gamma at
    each milestone epoch, and "cosine" decays to 0 at the end of training.
    """
    warmup = round(warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        epoch = step // steps_per_epoch
        return gamma ** sum(1 for m in milestones if epoch >= m)
    total = max(1, total_epochs * steps_per_epoch - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    total_epochs: int,
    warmup_epochs: float,
    schedule: str,
    milestones: Sequence[int],
    gamma: float,
) -> LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor` (its state_dict holds only numbers)."""
    fn: Callable[[int], float] = lambda step: lr_factor(  # noqa: E731
        step, steps_per_epoch, total_epochs, warmup_epochs, schedule, milestones, gamma
    )
    return LambdaLR(optimizer, fn)
