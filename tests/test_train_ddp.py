"""Two processes under torchrun (gloo, CPU) against one process with the same global batch."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLI, FAST, cli_env, run_cli

from robustlr.checkpoint import load_model

pytestmark = pytest.mark.slow  # subprocesses: real kills / torchrun

ARGS = [
    *FAST,
    "--epochs",
    "2",
    "--seed",
    "3",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--set",
    "max_steps_per_epoch=6",
    "--set",
    "augment=false",
]


def _rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_two_process_gloo_matches_one_process(tmp_path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    one = run_cli("train", *ARGS, "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            CLI,
            "train",
            *ARGS,
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x2" in two.stdout  # the run reported two processes
    assert two.stdout.count("run directory:") == 1  # rank-0 logging only
    r1, r2 = _rows(tmp_path / "one" / "metrics.csv"), _rows(tmp_path / "two" / "metrics.csv")
    assert len(r1) == len(r2) == 2
    for a, b in zip(r1, r2, strict=True):
        # the same images per step (DistributedSampler shards of one permutation), reduced
        assert a["images"] == b["images"] == 6 * 64
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        # BatchNorm statistics are per process (32 images) rather than over 64, so the numbers
        # agree closely but not bitwise
        assert b["loss"] == pytest.approx(a["loss"], rel=0.1, abs=0.05)
        assert abs(a["train_acc"] - b["train_acc"]) < 0.1
        assert abs(a["val_acc"] - b["val_acc"]) < 0.15
    assert not list((tmp_path / "two").glob("*.tmp"))
    model = load_model(tmp_path / "two" / "checkpoint.pt")
    assert not model.training
