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

import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from robustlr.checkpoint import Checkpoint

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


TEMP_SUFFIX = ".tmp"


def temp_glob(name: str = "*") -> str:
    """The glob of the temp files :func:`atomic_write` leaves for a target ``name`` when its
    process is killed mid-write (``.<name>.<random>.tmp``)."""
    return f".{name}.*{TEMP_SUFFIX}"


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the filesystem supports it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("cannot fsync directory %s; the rename is still atomic", directory)
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], None], *, durable: bool = False
) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temp file with a unique name in the
    target's folder, which is then renamed over ``path``. Any number of writers may write one
    target side by side: each rename is whole, the last one wins, and a reader never sees a
    partial file. On any failure (a full disk included) the temp file is removed and the old
    ``path`` is left as it was. ``durable`` also fsyncs the file and its folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a failed write names no file: name the target
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def locked_append(path: str | Path, text: Callable[[int], str]) -> Path:
    """Append ``text(size)`` to ``path`` under an exclusive lock (``fcntl.flock``); ``size`` is
    the file's size once the lock is held (0: a new or empty file, whose header is the
    caller's to write). Writers of one file in several processes append whole, one after the
    other, and lose or interleave nothing. When the append fails (a full disk), the file is
    cut back to ``size``: no partial row stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = memoryview(text(size).encode())
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except BaseException:
            os.truncate(fd, size)
            raise
    finally:
        os.close(fd)  # releases the lock
    return path


def check_output_path(path: str | Path, option: str, *, directory: bool = True) -> None:
    """UserError unless ``path`` can be written as a directory (``directory``) or a file: no
    existing part of it is a file where a folder must be (nor, for a file, a folder), and
    its nearest existing folder is writable. Commands call it before any work."""
    from robustlr.errors import UserError

    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise UserError(f"{option} {path} is a file, not a folder")
        if not directory and path.is_dir():
            raise UserError(f"{option} {path} is a folder, not a file")
    existing = path if (directory and path.is_dir()) else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} cannot be written: {existing} is not writable")
    if path.exists() and not directory and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path} cannot be written (no write permission)")


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
    return atomic_write_text(run_dir.parent / LATEST, run_dir.name + "\n")


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
    """Write a run's ``config.json`` (indented JSON, atomically) and return its path."""
    return atomic_write_text(Path(run_dir) / CONFIG, json.dumps(config, indent=2) + "\n")


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
    from robustlr.checkpoint import CheckpointError, read_checkpoint
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
    "TEMP_SUFFIX",
    "LoadedRun",
    "atomic_write",
    "atomic_write_text",
    "check_output_path",
    "find_checkpoint",
    "latest_run",
    "load_run",
    "locked_append",
    "new_run_dir",
    "read_run_config",
    "run_checkpoint",
    "temp_glob",
    "write_latest",
    "write_run_config",
]
