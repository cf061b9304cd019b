"""Device names, one vocabulary for every command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import re

import torch

from robustlr.errors import UserError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(UserError):
    """A device name outside the vocabulary, or CUDA asked for where there is none."""


def check_device_name(name: str) -> str:
    """``name`` if it is one of auto, cpu, cuda, cuda:N; DeviceError otherwise."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise DeviceError(f"device must be {DEVICE_HELP}, not {name!r}")
    return name


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda if available else cpu; cuda -> this process's GPU (``cuda:<local_rank>``).
    Raises :class:`DeviceError` for a bad name or when CUDA is asked for but absent."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} was asked for but no CUDA GPU is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device("cpu")
