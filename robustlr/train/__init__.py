"""The training engine shared by ``robustlr train`` and ``robustlr advtrain`` (DESIGN.md §4).

``train(config, on_event, hook, resume)`` runs one run; ``resolve``/``read_recipe``/
``parse_overrides`` build its :class:`TrainConfig`; a :class:`BatchHook` changes each batch
(e.g. adversarial examples) before the forward pass.
"""

from robustlr.train.config import (
    ConfigError,
    TrainConfig,
    dataset_defaults,
    effective_lr,
    parse_overrides,
    read_recipe,
    resolve,
)
from robustlr.train.engine import (
    NonFiniteLossError,
    TrainingError,
    TrainResult,
    train,
)
from robustlr.train.events import (
    CheckpointSaved,
    EpochEnded,
    EpochStarted,
    EventSink,
    RunFinished,
    RunStarted,
    StepEnded,
    TrainEvent,
)
from robustlr.train.hooks import BatchHook, HookedBatch, StepContext
from robustlr.train.resume import RESUMABLE, resume_config

__all__ = [
    "RESUMABLE",
    "BatchHook",
    "CheckpointSaved",
    "ConfigError",
    "EpochEnded",
    "EpochStarted",
    "EventSink",
    "HookedBatch",
    "NonFiniteLossError",
    "RunFinished",
    "RunStarted",
    "StepContext",
    "StepEnded",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "TrainingError",
    "dataset_defaults",
    "effective_lr",
    "parse_overrides",
    "read_recipe",
    "resolve",
    "resume_config",
    "train",
]
