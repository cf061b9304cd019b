"""Writers side by side and a full disk (slow tier): several processes append to one eval.csv
and replace one targets file and one outcomes file at once and lose, duplicate and corrupt
nothing; loads while a writer replaces the checkpoint record the hash of what they loaded; a
full disk (writes to /dev/full: a real ENOSPC) stops train and eval with one line and exit 2,
keeping the last good checkpoint and leaving no temp file."""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, assert_one_error, invoke_cli

import robustlr.runs as runs_module
from robustlr.attacks.spec import AttackSpec
from robustlr.attacks.targets import load_targets, save_targets
from robustlr.checkpoint import read_checkpoint, write_checkpoint
from robustlr.eval.runner import AttackResult, load_outcomes, save_outcomes
from robustlr.eval.session import append_rows
from robustlr.runs import CHECKPOINT, EVAL_CSV, OUTCOMES, TEMP_SUFFIX

pytestmark = pytest.mark.slow

WRITERS = 4
ROUNDS = 40
PAD = "x" * 3000  # long rows: an append larger than a pipe buffer, to expose interleaving


def _writer(folder: str, k: int) -> None:
    folder_path = Path(folder)
    spec = AttackSpec("pgd-untargeted")
    for j in range(ROUNDS):
        append_rows(
            folder_path / EVAL_CSV,
            [{"run": f"w{k}", "n": j, "attack_settings": f"{k}-{j}-{PAD}", "accuracy": 50.0}],
        )
        save_targets(folder_path / "targets.npy", torch.full((5000,), k, dtype=torch.int64))
        result = AttackResult(
            spec=spec,
            correct=np.full(5000, k % 2 == 0),
            success=np.full(5000, k % 2 == 1),
            targets=np.full(5000, k, dtype=np.int64),
            passes=k,
            seconds=0.0,
        )
        save_outcomes(folder_path / "o.npz", result, {"attack": spec.name, "n": 5000})


def _no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def test_concurrent_writers_lose_duplicate_and_corrupt_nothing(tmp_path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k)) for k in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    with (tmp_path / EVAL_CSV).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == WRITERS * ROUNDS
    seen = {(r["run"], r["n"]) for r in rows}
    assert seen == {(f"w{k}", str(j)) for k in range(WRITERS) for j in range(ROUNDS)}
    for r in rows:  # whole rows: header once, every field intact
        k, j = r["run"][1:], r["n"]
        assert r["attack_settings"] == f"{k}-{j}-{PAD}" and r["accuracy"] == "50.0"
    targets = load_targets(tmp_path / "targets.npy")
    assert len(targets) == 5000 and len(set(targets.tolist())) == 1
    outcomes = load_outcomes(tmp_path / "o.npz")
    k = int(outcomes["targets"][0])
    assert (outcomes["targets"] == k).all() and (outcomes["correct"] == (k % 2 == 0)).all()
    assert _no_temp_files(tmp_path) == []


def _replace_forever(path: str, a: str, b: str, started, stop) -> None:
    data = [Path(a).read_bytes(), Path(b).read_bytes()]
    i = 0
    while not stop.is_set():
        runs_module.atomic_write(path, lambda fh, d=data[i % 2]: fh.write(d))
        i += 1
        started.set()


def test_loads_record_the_hash_of_what_they_loaded_while_a_writer_replaces_it(
    tmp_path,
) -> None:
    model = torch.nn.Linear(4, 3)
    from robustlr.checkpoint import Checkpoint

    versions = {}
    for epoch in (1, 2):
        ckpt = Checkpoint("resnet26", {}, 3, model.state_dict(), epoch)
        path = write_checkpoint(ckpt, tmp_path / f"v{epoch}.pt")
        versions[epoch] = hashlib.sha256(path.read_bytes()).hexdigest()
    target = tmp_path / CHECKPOINT
    (tmp_path / CHECKPOINT).write_bytes((tmp_path / "v1.pt").read_bytes())
    ctx = multiprocessing.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    writer = ctx.Process(
        target=_replace_forever,
        args=(str(target), str(tmp_path / "v1.pt"), str(tmp_path / "v2.pt"), started, stop),
    )
    writer.start()
    try:
        assert started.wait(timeout=120)
        loads = [read_checkpoint(target) for _ in range(300)]
    finally:
        stop.set()
        writer.join(timeout=60)
    assert {c.epoch for c in loads} == {1, 2}  # the writer did replace it during the loads
    assert all(c.sha256 == versions[c.epoch] for c in loads)
    assert _no_temp_files(tmp_path) == []


def _disk_full_for(monkeypatch, prefix: str, after: int) -> None:
    """Temp files named ``prefix``... write to /dev/full (ENOSPC) from the ``after``+1-th on."""
    real = tempfile.mkstemp
    count = {"n": 0}

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        if str(kwargs.get("prefix", "")).startswith(prefix):
            count["n"] += 1
            if count["n"] > after:
                full = os.open("/dev/full", os.O_WRONLY)
                os.dup2(full, fd)
                os.close(full)
        return fd, name

    monkeypatch.setattr(runs_module.tempfile, "mkstemp", mkstemp)


def test_a_full_disk_during_train_keeps_the_last_checkpoint(tmp_path, monkeypatch) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    _disk_full_for(monkeypatch, f".{CHECKPOINT}.", after=1)
    args = [a if a != "1" else "2" for a in TINY_TRAIN]  # --epochs 2 (seed 3 stays)
    assert args[args.index("--epochs") + 1] == "2" and args[args.index("--seed") + 1] == "3"
    out = invoke_cli("train", *args, "--out", "run", cwd=tmp_path)
    assert out.exit_code == 2
    assert_one_error(out.output, "no space left", CHECKPOINT)
    kept = read_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert kept.epoch == 1
    assert _no_temp_files(tmp_path) == []


def test_a_full_disk_during_eval_writes_no_row_and_no_temp(tmp_path, monkeypatch) -> None:
    out = invoke_cli("train", *TINY_TRAIN, "--out", "run", cwd=tmp_path)
    assert out.exit_code == 0, out.output
    _disk_full_for(monkeypatch, ".clean-", after=0)
    out = invoke_cli(
        "eval", "--checkpoint", "run", "--attack", "fgsm", "--limit", "8", cwd=tmp_path
    )
    assert out.exit_code == 2
    assert_one_error(out.output, "no space left", OUTCOMES)
    assert not (tmp_path / "run" / EVAL_CSV).exists()
    assert _no_temp_files(tmp_path) == []


def _append_one(path: str, ready) -> None:
    ready.set()
    append_rows(Path(path), [{"run": "late", "accuracy": 1.0}])


def test_an_append_waits_for_the_lock(tmp_path) -> None:
    """The lock, not luck, orders appends: one held here keeps another process's rows (and
    its decision whether to write a header) out until it is released."""
    import fcntl
    import time

    path = tmp_path / EVAL_CSV
    append_rows(path, [{"run": "first", "accuracy": 1.0}])
    before = path.read_bytes()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    with path.open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        child = ctx.Process(target=_append_one, args=(str(path), ready))
        child.start()
        assert ready.wait(timeout=120)
        time.sleep(1.0)
        assert path.read_bytes() == before  # the child waits for the lock
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    child.join(timeout=60)
    assert child.exitcode == 0
    with path.open(newline="") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == ["first", "late"]
