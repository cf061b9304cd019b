"""Checkpoint round trips compare every field and tensor; a resume whose held-out accuracy falls
keeps best.pt."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAST, assert_same, invoke_cli

from robustlr.checkpoint import (
    Checkpoint,
    DataRecord,
    TrainingState,
    read_checkpoint,
    write_checkpoint,
)
from robustlr.runs import BEST, CHECKPOINT


def _full_checkpoint() -> Checkpoint:
    """A checkpoint with every field set to something other than its default."""
    gen = torch.Generator().manual_seed(0)
    model = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "bn.running_mean": torch.randn(4, generator=gen),
        "bn.num_batches_tracked": torch.tensor(17),
        "half": torch.randn(2, generator=gen).half(),
    }
    optimizer = {
        "state": {0: {"momentum_buffer": torch.randn(4, 3, 3, 3, generator=gen)}},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}],
    }
    training = TrainingState(
        optimizer=optimizer,
        scheduler={"last_epoch": 3, "base_lrs": [0.1]},
        scaler={"scale": 1024.0, "growth_tracker": 2},
        rng={"torch": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=gen), "py": 7},
        step_in_epoch=5,
        epoch_progress={"seen": 320, "correct": 123},
        best_val_acc=0.625,
        world_size=2,
    )
    data = DataRecord(
        "digits", 16, 3, 10, root="/data/x", val_fraction=0.2, split_seed=4,
        source_shape=(359, 8, 8, 1), fingerprint="f" * 64,
    )  # fmt: skip
    return Checkpoint(
        arch="resnet26",
        model_options={"width": 0.25, "small_input": True},
        num_classes=10,
        model=model,
        epoch=3,
        step=41,
        config={"mode": "adversarial", "epochs": 5, "lr": 0.1},
        data=data,
        training=training,
    )


# fields a checkpoint does not store but derives when read: ``sha256`` is the hash of the
# bytes it was loaded from (checked against the file below), "" for one built in memory
DERIVED = {"sha256"}


def as_read(written: Path, checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` as reading ``written`` must give it: its stored fields, and the SHA-256 of
    the file's bytes."""
    digest = hashlib.sha256(written.read_bytes()).hexdigest()
    return dataclasses.replace(checkpoint, sha256=digest)


def test_every_field_differs_from_its_default():
    """The round trip below can only catch a dropped field whose value is not the default."""
    full = _full_checkpoint()
    for obj in (full, full.data, full.training):
        for f in dataclasses.fields(obj):
            if f.name in DERIVED and obj is full:
                continue
            if f.default is not dataclasses.MISSING:
                assert getattr(obj, f.name) != f.default, f"{type(obj).__name__}.{f.name}"
            if f.default_factory is not dataclasses.MISSING:
                assert getattr(obj, f.name) != f.default_factory(), f"{type(obj).__name__}.{f.name}"


def test_checkpoint_round_trip_keeps_every_field_and_tensor(tmp_path):
    full = _full_checkpoint()
    written = write_checkpoint(full, tmp_path / "c.pt")
    assert_same(read_checkpoint(written), as_read(written, full))


def test_model_only_checkpoint_round_trip(tmp_path):
    bare = dataclasses.replace(_full_checkpoint(), config={}, data=None, training=None)
    written = write_checkpoint(bare, tmp_path / "c.pt")
    assert_same(read_checkpoint(written), as_read(written, bare))


def test_assert_same_sees_a_changed_tensor_and_a_dropped_field():
    full = _full_checkpoint()
    changed = _full_checkpoint()
    changed.model["conv.weight"][0, 0, 0, 0] += 1
    with pytest.raises(AssertionError, match=r"conv\.weight"):
        assert_same(changed, full)
    dropped = dataclasses.replace(full, training=dataclasses.replace(full.training, world_size=1))
    with pytest.raises(AssertionError, match="world_size"):
        assert_same(dropped, full)


# --- best.pt across a resume -----------------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    args = ["--epochs", "1", "--seed", "2", "--set", "max_steps_per_epoch=2"]
    result = invoke_cli("train", *FAST, *args, "--out", str(out), cwd=out.parent)
    assert result.exit_code == 0, result.output
    return out


def _resume_with_recorded_best(run: Path, tmp_path: Path, recorded_best: float) -> Path:
    """A copy of ``run`` whose checkpoint records ``recorded_best`` as the best held-out
    accuracy so far, resumed for a second epoch."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    saved = read_checkpoint(copy / CHECKPOINT)
    assert saved.training is not None
    saved.training.best_val_acc = recorded_best
    write_checkpoint(saved, copy / CHECKPOINT)
    result = invoke_cli("train", "--resume", "--epochs", "2", "--out", str(copy), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert read_checkpoint(copy / CHECKPOINT).epoch == 2
    return copy


@pytest.mark.slow
def test_a_resume_whose_accuracy_falls_keeps_best(one_epoch_run, tmp_path):
    # a best of 2.0 (above any accuracy): epoch 2's accuracy is below it
    run = _resume_with_recorded_best(one_epoch_run, tmp_path, 2.0)
    assert (run / BEST).read_bytes() == (one_epoch_run / BEST).read_bytes()
    assert read_checkpoint(run / CHECKPOINT).training.best_val_acc == 2.0


@pytest.mark.slow
def test_a_resume_whose_accuracy_rises_replaces_best(one_epoch_run, tmp_path):
    run = _resume_with_recorded_best(one_epoch_run, tmp_path, -1.0)
    assert read_checkpoint(run / BEST).epoch == 2
    assert read_checkpoint(run / CHECKPOINT).training.best_val_acc >= 0
