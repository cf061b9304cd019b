"""Attack targets: random wrong classes drawn once per image from a seeded generator, saved
with a hash so that every model faces the same targets; and least-likely classes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


def draw_random_targets(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """One uniformly random wrong class per label, from a generator seeded with ``seed``.

    The i-th target depends only on (seed, i, labels[i]), so a subset is a prefix of the draw.
    Shape: (N,) -> (N,) int64 on the CPU.
    """
    if num_classes < 2:
        raise ValueError("targeted attacks need at least 2 classes")
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=gen)
    return (labels.detach().cpu().long() + shift) % num_classes


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.save(fh, targets.detach().cpu().long().numpy().astype("<i8"))
    tmp.replace(path)
    return targets_sha256(targets)


def load_targets(path: str | Path) -> torch.Tensor:
    """Read targets written by ``save_targets`` (no pickles). Shape: (N,) int64."""
    return torch.from_numpy(np.load(Path(path), allow_pickle=False)).long()
