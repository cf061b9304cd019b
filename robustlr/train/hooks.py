"""The per-batch extension point of the training loop (adversarial training plugs in here).

For every training batch the engine calls, in order::

    x, y = hook.transform(model, x, y, ctx)          # e.g. replace/concatenate adversarial x
    logits = model(x)                                 # DDP-wrapped, autocast if AMP is on
    loss = hook.loss(logits, y, criterion, ctx)       # e.g. add a logit-pairing term
    extra = hook.metrics(logits, y, ctx)              # e.g. clean/adversarial accuracy sums

``transform`` receives the *unwrapped* model in train mode (switch BatchNorm to eval and back if
the attack needs it; leave the model in train mode when you return), runs outside autocast, and
may use ``ctx.generator`` (seeded per step, so resumed runs draw identical attack starts and
targets). ``metrics`` returns {name: (sum, count)} per batch; the engine sums both over the epoch
and ranks and writes sum / count as a column of metrics.csv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepContext:
    """Where the loop is: 0-based epoch and step within it, global step, device, AMP dtype."""

    epoch: int
    step: int
    global_step: int
    device: torch.device
    amp_dtype: torch.dtype | None
    generator: torch.Generator


class BatchHook:
    """Default hook: identity transform, plain criterion, no extra metrics. Subclass it.

    ``metric_names`` lists the extra metrics.csv columns that ``metrics`` fills.
    """

    metric_names: tuple[str, ...] = ()

    def transform(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the batch to train on. Shape: (B, C, H, W), (B,) -> (B', C, H, W), (B',)."""
        return x, y

    def loss(
        self, logits: torch.Tensor, y: torch.Tensor, criterion: Criterion, ctx: StepContext
    ) -> torch.Tensor:
        """The scalar training loss. Shape: (B', K), (B',) -> ()."""
        return criterion(logits, y)

    def metrics(
        self, logits: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> dict[str, tuple[torch.Tensor, int]]:
        """Extra per-batch metrics as {name: (sum, count)}. Shape: (B', K), (B',) -> {}."""
        return {}
