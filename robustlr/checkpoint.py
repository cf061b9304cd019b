"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

On disk a checkpoint is a plain dict (tensors, numbers, strings and containers) with at least
``model`` (a state_dict), ``arch``, ``model_options``, ``num_classes`` and ``epoch``. In code it
is a :class:`Checkpoint`: :func:`write_checkpoint` is its one writer and
:func:`read_checkpoint` its one reader. A training checkpoint adds the resolved ``config``,
what rebuilds its data (:class:`DataRecord`) and the state to resume from
(:class:`TrainingState`: optimizer/scheduler/scaler and RNG states, progress).
Pickled Python objects are never executed: loading such a file fails with
:class:`CheckpointError`.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlr.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "arch", "model_options", "num_classes", "epoch")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe, or for another model."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: temp file in the same directory, flush, fsync,
    rename. A reader never sees a half-written file, whenever the writer is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Atomically copy a checkpoint file (e.g. checkpoint.pt -> best.pt)."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return dst


def remove_stale_temp_files(directory: str | Path) -> int:
    """Delete temp files left by writers that were killed mid-write; return how many."""
    n = 0
    for p in Path(directory).glob(".*.pt.*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def load_checkpoint(
    path: str | Path, arch: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check its structure.

    Raises :class:`CheckpointError` if the file is missing, corrupt, carries pickled objects,
    lacks required keys, or (when ``arch`` is given) was written for another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint (no torch.save archive)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} refused: it holds pickled Python objects that a safe "
            "(weights_only) load does not run"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint: {first}"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a robustlr checkpoint (not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a robustlr checkpoint (missing {', '.join(missing)})"
        )
    if arch is not None and payload["arch"] != arch:
        raise CheckpointError(f"checkpoint {path} is for arch {payload['arch']!r}, not {arch!r}")
    return payload


def build_model(payload: dict[str, Any]) -> nn.Module:
    """Create the checkpoint's architecture and load its weights (strict)."""
    from robustlr.models import create_model, list_models

    arch = payload["arch"]
    if arch not in list_models():
        raise CheckpointError(f"checkpoint is for unknown arch {arch!r}")
    model = create_model(arch, num_classes=int(payload["num_classes"]), **payload["model_options"])
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint weights do not fit arch {arch!r} with its options: {first}"
        ) from None
    return model


def load_model(
    path: str | Path, arch: str | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The model stored in checkpoint ``path``, in eval mode, for [0, 1] image inputs.

    Normalisation is inside the model, so attacks and evaluation feed raw [0, 1] pixels.
    """
    payload = load_checkpoint(path, arch=arch, map_location="cpu")
    model = build_model(payload)
    return model.to(device).eval()


@dataclass(frozen=True)
class DataRecord:
    """What rebuilds a run's data exactly as training served it."""

    name: str
    image_size: int
    channels: int
    num_classes: int
    root: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_size": self.image_size,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "root": self.root,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], config: dict[str, Any]) -> DataRecord:
        """From a checkpoint's ``dataset`` entry (older ones lack the split: from ``config``)."""
        return cls(
            name=str(d["name"]),
            image_size=int(d["image_size"]),
            channels=int(d.get("channels", 3)),
            num_classes=int(d.get("num_classes", 0)),
            root=d.get("root", config.get("data")),
            val_fraction=float(d.get("val_fraction", config.get("val_fraction", 0.1))),
            split_seed=int(d.get("split_seed", config.get("split_seed", 0))),
        )


@dataclass
class TrainingState:
    """Everything beyond the weights that a run resumes from."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    step_in_epoch: int = 0
    epoch_progress: dict[str, Any] = field(default_factory=dict)
    best_val_acc: float | None = None
    world_size: int = 1

    _KEYS = ("optimizer", "scheduler", "scaler", "rng")


@dataclass
class Checkpoint:
    """A checkpoint in memory. ``config`` is the resolved TrainConfig dict ({} for a bare model
    checkpoint), ``data`` what rebuilds its data (None if not recorded), ``training`` the state
    to resume from (None for a model-only checkpoint)."""

    arch: str
    model_options: dict[str, Any]
    num_classes: int
    model: dict[str, torch.Tensor]
    epoch: int
    step: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    data: DataRecord | None = None
    training: TrainingState | None = None

    @property
    def mode(self) -> str:
        """The training mode recorded in the config ("" if none)."""
        return str(self.config.get("mode", ""))

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "model_options": dict(self.model_options),
            "num_classes": self.num_classes,
            "model": self.model,
            "epoch": self.epoch,
            "step": self.step,
            "config": dict(self.config),
        }
        if self.data is not None:
            payload["dataset"] = self.data.to_dict()
        if self.training is not None:
            t = self.training
            payload.update(
                optimizer=t.optimizer,
                scheduler=t.scheduler,
                scaler=t.scaler,
                rng=t.rng,
                step_in_epoch=t.step_in_epoch,
                epoch_progress=t.epoch_progress,
                best_val_acc=t.best_val_acc,
                world_size=t.world_size,
            )
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Checkpoint:
        """From a dict that :func:`load_checkpoint` checked (REQUIRED_KEYS present)."""
        config = dict(payload.get("config") or {})
        dataset = payload.get("dataset")
        training = None
        if all(k in payload for k in TrainingState._KEYS):
            training = TrainingState(
                optimizer=payload["optimizer"],
                scheduler=payload["scheduler"],
                scaler=payload["scaler"],
                rng=payload["rng"],
                step_in_epoch=int(payload.get("step_in_epoch", 0)),
                epoch_progress=dict(payload.get("epoch_progress") or {}),
                best_val_acc=payload.get("best_val_acc"),
                world_size=int(payload.get("world_size", 1)),
            )
        return cls(
            arch=str(payload["arch"]),
            model_options=dict(payload["model_options"]),
            num_classes=int(payload["num_classes"]),
            model=payload["model"],
            epoch=int(payload["epoch"]),
            step=int(payload.get("step", 0)),
            config=config,
            data=DataRecord.from_dict(dataset, config) if isinstance(dataset, dict) else None,
            training=training,
        )

    def build_model(self) -> nn.Module:
        """This checkpoint's architecture with its weights loaded (strict), in train mode."""
        return build_model(self.to_payload())


def write_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write ``checkpoint`` atomically (see :func:`save_checkpoint`); returns the path."""
    return save_checkpoint(checkpoint.to_payload(), path)


def read_checkpoint(
    path: str | Path, arch: str | None = None, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a checkpoint safely (see :func:`load_checkpoint`) as a :class:`Checkpoint`."""
    return Checkpoint.from_payload(load_checkpoint(path, arch=arch, map_location=map_location))


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DataRecord",
    "TrainingState",
    "build_model",
    "copy_checkpoint",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "remove_stale_temp_files",
    "save_checkpoint",
    "write_checkpoint",
]
