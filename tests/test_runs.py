"""The run directory and checkpoint contract, and the regressions it fixed: a resumed run keeps
its training mode and threat model, a checkpoint rebuilds the test data it was trained for, and
``--epochs 0`` is a usage error."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAST, assert_same, invoke_cli

import robustlr
from robustlr.checkpoint import Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from robustlr.data import DATASETS, dataset_spec, load
from robustlr.eval.session import open_checkpoint
from robustlr.runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    LATEST,
    METRICS,
    find_checkpoint,
    latest_run,
    load_run,
    read_run_config,
)
from robustlr.train import ConfigError, dataset_defaults, resolve, resume_config
from robustlr.train import train as train_engine

TINY = [*FAST, "--epochs", "1", "--batch-size", "16", "--seed", "3", "--device", "cpu"]
TINY_SETS = ["--set", "max_steps_per_epoch=2", "--set", "val_fraction=0.05"]
ADV_COLUMNS = {"clean_acc", "adv_acc", "attack_success"}


def _columns(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return next(csv.reader(fh))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny regular and one tiny adversarial run (1 epoch of 2 steps each)."""
    cwd = tmp_path_factory.mktemp("runs")
    adv = invoke_cli("advtrain", *TINY, *TINY_SETS, "--steps", "1", "--out", "adv", cwd=cwd)
    assert adv.exit_code == 0, adv.output
    reg = invoke_cli("train", *TINY, *TINY_SETS, "--out", "reg", cwd=cwd)
    assert reg.exit_code == 0, reg.output
    return {"cwd": cwd, "adv": cwd / "adv", "reg": cwd / "reg"}


# ---- bug 1: a resumed run keeps its mode and threat model ----------------------------------------
def test_resuming_an_adversarial_run_with_train_is_refused(runs) -> None:
    before = (runs["adv"] / CHECKPOINT).read_bytes()
    out = invoke_cli("train", "--resume", "--epochs", "2", "--out", "adv", cwd=runs["cwd"])
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), out.output
    assert "adversarial run" in lines[0] and "advtrain --resume" in lines[0]
    assert (runs["adv"] / CHECKPOINT).read_bytes() == before  # nothing trained


def test_resuming_a_regular_run_with_advtrain_is_refused(runs) -> None:
    out = invoke_cli("advtrain", "--resume", "--epochs", "2", "--out", "reg", cwd=runs["cwd"])
    assert out.exit_code == 2, out.output
    assert out.output.strip().startswith("Error:") and "regular run" in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_resume_refuses_another_threat_model(runs) -> None:
    with pytest.raises(ConfigError, match="keeps its threat model"):
        resume_config(runs["adv"], {"adversarial": {"steps": 7}})


@pytest.mark.slow
def test_a_resumed_adversarial_run_trains_adversarially(runs, tmp_path) -> None:
    """The library resumes in the saved mode whoever calls it: no hook is passed here."""
    run = tmp_path / "adv"
    shutil.copytree(runs["adv"], run)
    config = resume_config(run, {"epochs": 2})
    assert config.mode == "adversarial" and config.adversarial["steps"] == 1
    train_engine(config, resume=True)
    assert set(_columns(run / METRICS)) >= ADV_COLUMNS
    with (run / METRICS).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0.0 <= float(r["attack_success"]) <= 1.0 for r in rows)


def test_the_adversarial_section_is_validated_with_the_config() -> None:
    with pytest.raises(ConfigError, match="adversarial training"):
        resolve({"mode": "adversarial", "adversarial": {"stpes": 3}})
    with pytest.raises(ConfigError, match="adversarial training"):
        resolve({"mode": "adversarial", "adversarial": {"mix": 1.5}})
    with pytest.raises(ConfigError, match="regular run"):
        resolve({"mode": "regular", "adversarial": {"steps": 3}})
    with pytest.raises(ConfigError, match="mode must be"):
        resolve({"mode": "adverserial"})
    resolved = resolve({"mode": "adversarial", "adversarial": {"steps": 3}}).adversarial
    assert resolved["steps"] == 3 and resolved["eps"] == pytest.approx(16 / 255)


# ---- bug 2: one dataset registry; a checkpoint rebuilds its test data ----------------------------
@pytest.mark.parametrize("name", DATASETS)
def test_served_size_is_the_training_size(name) -> None:
    spec = dataset_spec(name)
    defaults = dataset_defaults(name)
    assert defaults["image_size"] == spec.info.image_size
    if name != "imagefolder":
        config = resolve({"dataset": name})
        assert config.image_size == spec.info.image_size
        assert (config.epochs, config.batch_size) == (defaults["epochs"], defaults["batch_size"])
    for key in ("width", "epochs", "batch_size", "small_input"):
        assert defaults[key] is not None, (name, key)


def test_the_python_api_serves_digits_as_training_does() -> None:
    assert load("digits", "test").info.image_size == resolve({"arch": "resnet26"}).image_size


def test_load_run_gives_the_model_and_its_own_test_set(runs) -> None:
    loaded = robustlr.load_run(runs["reg"])
    assert loaded.path == runs["reg"] / BEST and not loaded.model.training
    assert loaded.checkpoint.data is not None and loaded.checkpoint.data.image_size == 16
    x, _ = loaded.test_set[0]
    assert x.shape == (3, 16, 16)  # the run's 16x16, not the dataset's default 8x8
    # the same images that `robustlr eval` attacks
    target = open_checkpoint(loaded.path, torch.device("cpu"))
    images, labels, _ = target.load_images("test", limit=5)
    batch = loaded.test_set.__getitems__(list(range(5)))
    assert torch.equal(images, batch[0]) and torch.equal(labels, batch[1])
    with torch.no_grad():
        assert loaded.model(images).shape == (5, 10)


def test_load_run_needs_a_recorded_dataset(tmp_path) -> None:
    from robustlr.models import create_model

    model = create_model("resnet26", num_classes=10, small_input=True, width=0.125)
    bare = Checkpoint("resnet26", {"small_input": True, "width": 0.125}, 10, model.state_dict(), 0)
    path = write_checkpoint(bare, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="does not record its dataset"):
        load_run(path)


# ---- bug 3: --epochs 0 ---------------------------------------------------------------------------
def test_zero_epochs_is_a_usage_error(tmp_path) -> None:
    out = invoke_cli("train", "--arch", "resnet26", "--epochs", "0", cwd=tmp_path)
    assert out.exit_code == 2, out.output
    assert out.output.strip() == "Error: epochs must be at least 1, not 0"
    assert not (tmp_path / "runs").exists()


# ---- the run directory contract ------------------------------------------------------------------
def test_run_layout_and_newest_run(runs) -> None:
    run = runs["reg"]
    for name in (CONFIG, METRICS, CHECKPOINT, BEST):
        assert (run / name).is_file(), name
    assert read_run_config(run)["mode"] == "regular"
    assert (runs["cwd"] / LATEST).read_text().strip() == "reg"  # trained last
    assert latest_run(runs["cwd"]) == run
    assert find_checkpoint(None, runs["cwd"]) == run / BEST
    assert find_checkpoint(run) == run / BEST
    assert find_checkpoint(run / CHECKPOINT) == run / CHECKPOINT


def test_training_checkpoint_round_trip(runs, tmp_path) -> None:
    saved = read_checkpoint(runs["adv"] / CHECKPOINT)
    assert saved.mode == "adversarial" and saved.training is not None
    assert saved.training.world_size == 1 and saved.training.step_in_epoch == 0
    assert saved.data is not None and saved.data.name == "digits"
    copy = read_checkpoint(write_checkpoint(saved, tmp_path / "copy.pt"))
    assert copy.sha256 == hashlib.sha256((tmp_path / "copy.pt").read_bytes()).hexdigest()
    assert_same(copy, dataclasses.replace(saved, sha256=copy.sha256))
