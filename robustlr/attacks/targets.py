"""Attack targets: random wrong classes drawn once per image from a seeded generator, saved
with a hash so that every model faces the same targets; and least-likely classes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from robustlr.runs import atomic_write


def random_target_shifts(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """The first ``n`` draws of ``seed``: per image a shift in [1, num_classes - 1], so that
    ``(label + shift) % num_classes`` is a uniformly random wrong class. Shape: -> (n,) int64."""
    if num_classes < 2:
        raise ValueError("targeted attacks need at least 2 classes")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, num_classes, (n,), generator=gen)


def draw_random_targets(
    labels: torch.Tensor, num_classes: int, seed: int, example_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """One uniformly random wrong class per label, drawn once per image from ``seed``.

    Image i (``example_ids[i]``, default i) gets the shift of draw number i, so its target
    depends only on (seed, its id, its label): any subset or shard gets the same targets.
    Shape: labels (N,), example_ids (N,) -> (N,) int64 on the CPU.
    """
    ids = torch.arange(len(labels)) if example_ids is None else example_ids.long().cpu()
    n = int(ids.max()) + 1 if len(ids) else 0
    shifts = random_target_shifts(n, num_classes, seed)[ids]
    return (labels.detach().cpu().long() + shifts) % num_classes


def least_likely_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The wrong class of lowest clean logit per example (the true class is never a target,
    even where the model finds it least likely). Shape: (B, K), (B,) -> (B,)."""
    masked = logits.detach().float().scatter(1, labels.view(-1, 1), float("inf"))
    return masked.argmin(dim=1)


def targets_sha256(targets: torch.Tensor) -> str:
    """SHA-256 of the targets as little-endian int64 bytes."""
    return hashlib.sha256(targets.detach().cpu().long().numpy().astype("<i8").tobytes()).hexdigest()


def save_targets(path: str | Path, targets: torch.Tensor) -> str:
    """Write the targets as a ``.npy`` int64 array; returns their SHA-256."""
    array = targets.detach().cpu().long().numpy().astype("<i8")
    atomic_write(path, lambda fh: np.save(fh, array))
    return targets_sha256(targets)


def load_targets(path: str | Path) -> torch.Tensor:
    """Read targets written by ``save_targets`` (no pickles). Shape: (N,) int64."""
    return torch.from_numpy(np.load(Path(path), allow_pickle=False)).long()
