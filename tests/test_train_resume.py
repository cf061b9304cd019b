"""Kill-and-resume: a run SIGKILLed after its first checkpoint, resumed with --resume, ends with
bitwise the same weights (deterministic CPU mode) as a run that was never interrupted."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time

import pytest
from helpers import FAST, assert_bitwise_equal, cli_command, cli_env, model_state, run_cli

pytestmark = pytest.mark.slow  # subprocesses: real kills / torchrun

ARGS = [
    *FAST,
    "--epochs",
    "3",
    "--seed",
    "7",
    "--deterministic",
    "--device",
    "cpu",
    "--set",
    "max_steps_per_epoch=5",
    "--set",
    "checkpoint_every_steps=3",
]


def _metric_rows(path):
    with open(path, newline="") as f:
        return [(r["epoch"], r["loss"], r["train_acc"], r["val_acc"]) for r in csv.DictReader(f)]


def test_kill_and_resume_is_bitwise_exact(tmp_path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.Popen(
        cli_command("train", *ARGS, "--out", str(killed)),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    deadline = time.monotonic() + 300
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if proc.stderr:
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    reference = run_cli("train", *ARGS, "--out", str(full), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    interrupted = model_state(killed / "checkpoint.pt")
    assert any(
        not (a == b).all()
        for a, b in zip(
            interrupted.values(), model_state(full / "checkpoint.pt").values(), strict=True
        )
        if a.is_floating_point()
    ), "the run finished before it was killed: nothing was resumed"

    resumed = run_cli("train", "--resume", "--out", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    assert_bitwise_equal(model_state(full / "checkpoint.pt"), model_state(killed / "checkpoint.pt"))
    assert_bitwise_equal(model_state(full / "best.pt"), model_state(killed / "best.pt"))
    assert _metric_rows(full / "metrics.csv") == _metric_rows(killed / "metrics.csv")
    assert len(_metric_rows(killed / "metrics.csv")) == 3
