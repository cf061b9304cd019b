"""The run directory contract: its file names, the ``latest`` pointer, finding the newest run,
and opening a run as a model with its matching test data (:func:`load_run`).

A run directory (``runs/<arch>-<mode>-<timestamp>`` by default) holds::

    config.json     the resolved TrainConfig (plus what training derived from it)
    metrics.csv     one row per epoch
    checkpoint.pt   the latest training checkpoint (robustlr.checkpoint.Checkpoint)
    best.pt         the checkpoint of the best validation accuracy so far
    eval.csv        evaluation rows, appended by ``robustlr eval``
    outcomes/       per-example attack outcomes (npz)
    targets/        the random target classes drawn for targeted attacks (npy)

A model robustlr did not train (``robustlr eval --model``) gets ``runs/<name>`` with
``external.json`` (robustlr.eval.external: what was evaluated) in place of config and
checkpoints, and the same eval.csv, outcomes/ and targets/.

and ``<runs root>/latest`` names the newest run. This module is the only place these names
are spelled out; train, eval, report and study import them from here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from robustlr.checkpoint import Checkpoint, CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
METRICS = "metrics.csv"
EVAL_CSV = "eval.csv"
OUTCOMES = "outcomes"
TARGETS = "targets"
LATEST = "latest"
EXTERNAL_RECORD = "external.json"  # an external model's record (robustlr.eval.external)
# the checkpoint a run is evaluated with, in order of preference
CHECKPOINT_PREFERENCE: tuple[str, ...] = (BEST, CHECKPOINT)


def new_run_dir(runs_root: str | Path, arch: str, mode: str) -> Path:
    """A fresh, not yet existing ``<runs_root>/<arch>-<mode>-<YYYYmmdd-HHMMSS>`` path."""
    base = Path(runs_root) / f"{arch}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_latest(run_dir: str | Path) -> Path:
    """Point ``<parent>/latest`` (a one-line text file) at ``run_dir``; written atomically."""
    run_dir = Path(run_dir)
    pointer = run_dir.parent / LATEST
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST}.", dir=run_dir.parent)
    with os.fdopen(fd, "w") as f:
        f.write(run_dir.name + "\n")
    os.replace(tmp, pointer)
    return pointer


def latest_run(runs_root: str | Path = "runs") -> Path:
    """The run directory ``<runs_root>/latest`` points at; FileNotFoundError if none."""
    pointer = Path(runs_root) / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no runs found ({pointer} does not exist)")
    run = Path(runs_root) / pointer.read_text().strip()
    if not run.is_dir():
        raise FileNotFoundError(f"{pointer} points at {run}, which does not exist")
    return run


def run_checkpoint(run_dir: str | Path) -> Path:
    """A run's checkpoint to evaluate: best.pt, else checkpoint.pt (FileNotFoundError)."""
    run = Path(run_dir)
    for name in CHECKPOINT_PREFERENCE:
        if (run / name).is_file():
            return run / name
    raise FileNotFoundError(f"run {run} has no {' or '.join(CHECKPOINT_PREFERENCE)} yet")


def find_checkpoint(checkpoint: str | Path | None, runs_root: str | Path = "runs") -> Path:
    """The given checkpoint (a file, or a run directory: its :func:`run_checkpoint`), or the
    newest run's best checkpoint (else its latest). FileNotFoundError when there is none."""
    if checkpoint is not None:
        path = Path(checkpoint)
        return run_checkpoint(path) if path.is_dir() else path
    return run_checkpoint(latest_run(runs_root))


def write_run_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write a run's ``config.json`` (indented JSON) and return its path."""
    path = Path(run_dir) / CONFIG
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``config.json`` as a dict; {} (with a warning if unreadable) when there is none."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class LoadedRun:
    """A trained model (eval mode, on its device) and the test split it was trained for."""

    model: nn.Module
    test_set: Dataset
    checkpoint: Checkpoint
    path: Path


def load_run(
    path: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    device: str | torch.device = "cpu",
) -> LoadedRun:
    """Open a run (its directory or one of its checkpoints) as its model and matching data.

    The data is rebuilt from what the checkpoint records (dataset, image size, data path,
    train/val split), so the model sees images as it did in training. ``data`` overrides the
    recorded data path (e.g. the run was trained on another machine).
    Raises :class:`CheckpointError` (or ``robustlr.data.DataError``) on bad input.
    """
    from robustlr.data import load as load_dataset

    file = find_checkpoint(path)
    ckpt = read_checkpoint(file)
    if ckpt.data is None:
        raise CheckpointError(f"checkpoint {file} does not record its dataset")
    record = ckpt.data
    test_set = load_dataset(
        record.name,
        split,
        data if data is not None else record.root,
        image_size=record.image_size,
        augment=False,
        val_fraction=record.val_fraction,
        split_seed=record.split_seed,
    )
    model = ckpt.build_model().to(device).eval()
    return LoadedRun(model, test_set, ckpt, file)


__all__ = [
    "BEST",
    "CHECKPOINT",
    "CHECKPOINT_PREFERENCE",
    "CONFIG",
    "EVAL_CSV",
    "EXTERNAL_RECORD",
    "LATEST",
    "METRICS",
    "OUTCOMES",
    "TARGETS",
    "LoadedRun",
    "find_checkpoint",
    "latest_run",
    "load_run",
    "new_run_dir",
    "read_run_config",
    "run_checkpoint",
    "write_latest",
    "write_run_config",
]
