"""The configuration of a run being resumed: the saved one, with a few settings changeable."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustlr.checkpoint import CheckpointError, read_checkpoint
from robustlr.runs import CHECKPOINT
from robustlr.train.config import ConfigError, TrainConfig, resolve

log = logging.getLogger(__name__)

# settings a resumed run may change without invalidating its checkpoint
RESUMABLE = frozenset(
    {"epochs", "device", "num_workers", "checkpoint_every_steps", "eval_batch_size", "download"}
)


def resume_config(
    run_dir: str | Path, overrides: Mapping[str, Any], mode: str | None = None
) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` applied.

    Only :data:`RESUMABLE` keys may differ from the saved values; an override of ``arch`` that
    differs from the checkpoint's raises :class:`CheckpointError`, other differing keys are
    ignored with a warning. The run keeps its training mode and threat model: ``mode`` (the
    mode of the command resuming it) or an ``adversarial`` override that contradicts the saved
    ones raises :class:`ConfigError`.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    checkpoint = read_checkpoint(path)
    arch = overrides.get("arch")
    if arch is not None and arch != checkpoint.arch:
        raise CheckpointError(f"checkpoint {path} is for arch {checkpoint.arch!r}, not {arch!r}")
    saved = dict(checkpoint.config)
    if not saved:
        raise CheckpointError(f"{path} holds no training config to resume")
    saved_mode = saved.get("mode", "regular")
    mode = mode if mode is not None else overrides.get("mode")
    if mode is not None and mode != saved_mode:
        command = "advtrain" if saved_mode == "adversarial" else "train"
        raise ConfigError(
            f"{run_dir} is {'an' if saved_mode[0] in 'aeiou' else 'a'} {saved_mode} run: "
            f"resume it with `robustlr {command} --resume`"
        )
    asked = dict(overrides.get("adversarial") or {})
    kept = saved.get("adversarial") or {}
    if any(kept.get(k) != v for k, v in asked.items()):
        raise ConfigError(f"{run_dir} keeps its threat model on resume: drop the attack options")
    changes = {}
    for key, value in overrides.items():
        if key in RESUMABLE:
            changes[key] = value
        elif key == "adversarial":
            continue  # checked above: equal to the saved threat model
        elif saved.get(key) != value and key != "out":
            log.warning(
                "ignoring %s=%r on resume (the run was started with %r)", key, value, saved.get(key)
            )
    return resolve(saved, changes, {"out": str(run_dir)})
