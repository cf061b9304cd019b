"""Events the training engine emits (on rank 0) for a front end to render; it never prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunStarted:
    run_dir: Path
    config: dict[str, Any]
    start_epoch: int
    start_step: int
    epochs: int
    steps_per_epoch: int
    world_size: int
    device: str
    num_params: int
    train_images: int
    val_images: int


@dataclass(frozen=True)
class EpochStarted:
    epoch: int  # 1-based
    epochs: int
    steps: int
    start_step: int


@dataclass(frozen=True)
class StepEnded:
    epoch: int  # 1-based
    step: int  # 1-based within the epoch
    steps: int
    loss: float
    lr: float
    images: int  # global images this step


@dataclass(frozen=True)
class EpochEnded:
    epoch: int  # 1-based
    epochs: int
    row: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved:
    path: Path
    epoch: int
    step: int
    best: bool


@dataclass(frozen=True)
class RunFinished:
    run_dir: Path
    epochs: int
    best_val_acc: float | None


TrainEvent = RunStarted | EpochStarted | StepEnded | EpochEnded | CheckpointSaved | RunFinished
EventSink = Callable[[TrainEvent], None]
