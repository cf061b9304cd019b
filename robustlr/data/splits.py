"""Seeded held-out validation slice of a training set (model selection never sees the test set)."""

from __future__ import annotations

import torch


def train_val_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into (train, val) index tensors with a seeded permutation.

    The split depends only on ``n``, ``val_fraction`` and ``seed`` (not on the training seed), so
    every run on the same data holds out the same images. Both halves are returned sorted.

    Shape: () -> ((n - v,), (v,)) int64, v = round(n * val_fraction).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
