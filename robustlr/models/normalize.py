"""Input normalisation inside the model, so that every model takes [0, 1] pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are (persistent) buffers.

    Shape: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"


def make_normalize(mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """A ``Normalize``, or ``nn.Identity`` when both mean and std are None."""
    if mean is None and std is None:
        return nn.Identity()
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither (None disables normalisation)")
    return Normalize(mean, std)
