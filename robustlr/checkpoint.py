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

import hashlib
import io
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlr.errors import UserError
from robustlr.runs import atomic_write, temp_glob

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "arch", "model_options", "num_classes", "epoch")
# config entries that say where a run lives, not what it is: never written into a checkpoint,
# so that a checkpoint's bytes (and its SHA-256) depend on its contents only
LOCATION_KEYS = ("out",)


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe, or for another model."""


def _serialise(payload: dict[str, Any]) -> bytes:
    """``payload`` as torch.save bytes (serialised in memory, so that a write to disk fails
    only as an OSError, a full disk included, never inside torch's zip writer)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`robustlr.runs.atomic_write`: a uniquely
    named temp file in the same directory, flush, fsync, rename). A reader never sees a
    half-written file, whenever the writer is killed; a failed write (a full disk) leaves the
    previous checkpoint and no temp file."""
    data = _serialise(payload)
    return atomic_write(path, lambda fh: fh.write(data), durable=True)


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Atomically copy a checkpoint file (e.g. checkpoint.pt -> best.pt)."""
    data = Path(src).read_bytes()
    return atomic_write(dst, lambda fh: fh.write(data), durable=True)


def remove_stale_temp_files(directory: str | Path) -> int:
    """Delete temp files left by writers that were killed mid-write; return how many."""
    n = 0
    for p in Path(directory).glob(temp_glob("*.pt")):
        p.unlink(missing_ok=True)
        n += 1
    return n


def bytes_sha256(data: bytes) -> str:
    """SHA-256 (hex) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_checkpoint_bytes(path: str | Path) -> bytes:
    """The bytes of checkpoint file ``path``, read once (CheckpointError if absent)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"checkpoint {path} does not exist") from None


def load_checkpoint(
    path: str | Path, arch: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check its structure.

    Raises :class:`CheckpointError` if the file is missing, corrupt, carries pickled objects,
    lacks required keys, or (when ``arch`` is given) was written for another architecture.
    """
    return load_checkpoint_bytes(read_checkpoint_bytes(path), path, arch, map_location)


def load_checkpoint_bytes(
    data: bytes,
    path: str | Path,
    arch: str | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """:func:`load_checkpoint` of bytes already read (``path`` names them in messages)."""
    path = Path(path)
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint (no torch.save archive)"
        )
    buffer.seek(0)
    try:
        payload = torch.load(buffer, map_location=map_location, weights_only=True)
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
    check_finite(payload["model"])
    try:
        model = create_model(
            arch, num_classes=int(payload["num_classes"]), **payload["model_options"]
        )
    except (TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint model options do not fit arch {arch!r}: {first}"
        ) from None
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint weights do not fit arch {arch!r} with its options: {first}"
        ) from None
    return model


def check_finite(state: dict[str, Any]) -> None:
    """CheckpointError naming the first weight tensor of ``state`` that holds NaN or inf."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(
                    f"checkpoint weight {name} holds {bad} NaN/inf value(s): the model is broken"
                )


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
    # the test split's identity (robustlr.data.identity); empty in older checkpoints
    source_shape: tuple[int, ...] = ()
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_size": self.image_size,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "root": self.root,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "source_shape": list(self.source_shape),
            "fingerprint": self.fingerprint,
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
            source_shape=tuple(int(v) for v in d.get("source_shape") or ()),
            fingerprint=str(d.get("fingerprint") or ""),
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
    sha256: str = ""  # of the bytes it was read from ("" for one built in memory)

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
            "config": {k: v for k, v in self.config.items() if k not in LOCATION_KEYS},
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
    """Read a checkpoint safely (see :func:`load_checkpoint`) as a :class:`Checkpoint`.

    The file is read once: its ``sha256`` is the hash of exactly the bytes that were loaded
    (a writer replacing the file meanwhile cannot make them disagree)."""
    data = read_checkpoint_bytes(path)
    payload = load_checkpoint_bytes(data, path, arch=arch, map_location=map_location)
    checkpoint = Checkpoint.from_payload(payload)
    checkpoint.sha256 = bytes_sha256(data)
    return checkpoint


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DataRecord",
    "TrainingState",
    "build_model",
    "bytes_sha256",
    "check_finite",
    "copy_checkpoint",
    "load_checkpoint",
    "load_checkpoint_bytes",
    "load_model",
    "read_checkpoint",
    "read_checkpoint_bytes",
    "remove_stale_temp_files",
    "save_checkpoint",
    "write_checkpoint",
]
