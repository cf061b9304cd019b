"""Shared helpers of the data and training tests: data location, CLI subprocesses, fast runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / "robustlr" / "__main__.py")  # the robustlr entry point, runnable as a script

# small and fast: ~0.9M parameters at 16x16
FAST = ["--arch", "resnet26", "--width", "0.25", "--image-size", "16", "--small-input"]


def shared_data_dir() -> Path:
    """``$ROBUSTLR_DATA_DIR`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("ROBUSTLR_DATA_DIR", REPO.parent / "shared" / "data"))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, CLI, *args]


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``robustlr <args>`` in a subprocess; returns the completed process (text)."""
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max()})"
