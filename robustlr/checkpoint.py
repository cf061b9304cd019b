"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a plain dict (tensors, numbers, strings and containers) with at least ``model``
(a state_dict), ``arch``, ``model_options``, ``num_classes``, ``epoch`` and ``step``; training
checkpoints add the optimizer/scheduler/scaler and RNG states and the resolved ``config``.
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
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "arch", "model_options", "num_classes", "epoch")


class CheckpointError(ValueError):
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


__all__ = [
    "CheckpointError",
    "build_model",
    "copy_checkpoint",
    "load_checkpoint",
    "load_model",
    "remove_stale_temp_files",
    "save_checkpoint",
]
