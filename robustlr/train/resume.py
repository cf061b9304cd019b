"""The configuration of a run being resumed: the saved one, with a few settings changeable."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustlr.checkpoint import CheckpointError, load_checkpoint
from robustlr.train.config import TrainConfig, resolve

log = logging.getLogger(__name__)

# settings a resumed run may change without invalidating its checkpoint
RESUMABLE = frozenset(
    {"epochs", "device", "num_workers", "checkpoint_every_steps", "eval_batch_size", "download"}
)


def resume_config(run_dir: str | Path, overrides: Mapping[str, Any]) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` applied.

    Only :data:`RESUMABLE` keys may differ from the saved values; an override of ``arch`` that
    differs from the checkpoint's raises :class:`CheckpointError`, other differing keys are
    ignored with a warning.
    """
    run_dir = Path(run_dir)
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    arch = overrides.get("arch")
    if arch is not None and arch != payload["arch"]:
        raise CheckpointError(
            f"checkpoint {run_dir / 'checkpoint.pt'} is for arch {payload['arch']!r}, not {arch!r}"
        )
    saved = dict(payload.get("config") or {})
    if not saved:
        raise CheckpointError(f"{run_dir / 'checkpoint.pt'} holds no training config to resume")
    changes = {}
    for key, value in overrides.items():
        if key in RESUMABLE:
            changes[key] = value
        elif saved.get(key) != value and key != "out":
            log.warning(
                "ignoring %s=%r on resume (the run was started with %r)", key, value, saved.get(key)
            )
    return resolve(saved, changes, {"out": str(run_dir)})
