"""The per-batch extension point of the training loop (adversarial training plugs in here).

For every training batch the engine calls, in order::

    batch = hook.transform(model, x, y, ctx)         # e.g. replace/concatenate adversarial x
    logits = model(batch.x)                           # DDP-wrapped, autocast if AMP is on
    loss = hook.loss(logits, batch, criterion, ctx)   # e.g. add a logit-pairing term
    extra = hook.metrics(logits, batch, ctx)          # e.g. clean/adversarial accuracy sums

``transform`` receives the *unwrapped* model in train mode (switch BatchNorm to eval and back if
the attack needs it; leave the model in train mode when you return), runs outside autocast, and
may use ``ctx.generator`` (seeded per step, so resumed runs draw identical attack starts and
targets). ``metrics`` returns {name: (sum, count)} per batch; the engine sums both over the epoch
and ranks and writes sum / count as a column of metrics.csv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepContext:
    """Where the loop is: 0-based epoch and step within it, global step, device, AMP dtype,
    the step's seeded generator and the model's class count."""

    epoch: int
    step: int
    global_step: int
    device: torch.device
    amp_dtype: torch.dtype | None
    generator: torch.Generator
    num_classes: int


@dataclass(frozen=True)
class HookedBatch:
    """The batch to train on, with the hook's notes about it (``state``) for loss and metrics.

    Shape: x (B', C, H, W), y (B',).
    """

    x: torch.Tensor
    y: torch.Tensor
    state: Any = None


class BatchHook:
    """Default hook: identity transform, plain criterion, no extra metrics. Subclass it.

    ``metric_names`` lists the extra metrics.csv columns that ``metrics`` fills.
    """

    metric_names: tuple[str, ...] = ()

    def transform(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> HookedBatch:
        """Return the batch to train on. Shape: (B, C, H, W), (B,) -> (B', C, H, W), (B',)."""
        return HookedBatch(x, y)

    def loss(
        self, logits: torch.Tensor, batch: HookedBatch, criterion: Criterion, ctx: StepContext
    ) -> torch.Tensor:
        """The scalar training loss. Shape: (B', K) -> ()."""
        return criterion(logits, batch.y)

    def metrics(
        self, logits: torch.Tensor, batch: HookedBatch, ctx: StepContext
    ) -> dict[str, tuple[torch.Tensor, int]]:
        """Extra per-batch metrics as {name: (sum, count)}. Shape: (B', K) -> {}."""
        return {}
