"""Seeding and RNG state capture, so that a resumed run draws exactly what the original did."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from robustlr.data import epoch_seed


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The seed of one training step (dropout, attack starts, image-folder transforms).

    It depends only on (seed, epoch, step in epoch, rank), so a run resumed at any checkpoint
    reseeds each later step exactly as the uninterrupted run did.
    """
    return epoch_seed(seed, epoch, salt=2 + step * 65_537 + rank * 1_000_000_007)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (and no cuDNN autotuning) when ``enabled``."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def capture_rng_states() -> dict[str, Any]:
    """RNG states of python, numpy, torch and CUDA, as plain containers and tensors only
    (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
