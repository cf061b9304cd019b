"""Training engine and ``robustlr train``: config, schedule, checkpoints, runs, bad input."""

from __future__ import annotations

import csv
import itertools
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import FAST, image_folder, invoke_cli, run_cli

from robustlr.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from robustlr.cli.train import train
from robustlr.data.registry import dataset_spec
from robustlr.errors import UserError
from robustlr.train import (
    BatchHook,
    ConfigError,
    EpochEnded,
    EpochStarted,
    HookedBatch,
    RunFinished,
    RunStarted,
    StepEnded,
    parse_overrides,
    read_recipe,
    resolve,
)
from robustlr.train import train as train_engine
from robustlr.train.engine import is_new_best
from robustlr.train.schedule import lr_factor


def test_config_layers_and_overrides(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[train]\narch = "lrnet26"\nepochs = 7\nlr = 0.2\n[train.model]\nkernel_size = 5\n'
    )
    cfg = resolve(
        read_recipe(recipe),
        {"epochs": 3},
        parse_overrides(["lr=0.05", "milestones=[1, 2]", "model.m=4", "label_smoothing=0.1"]),
    )
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.milestones) == ("lrnet26", 3, 0.05, [1, 2])
    assert cfg.model_options == {"kernel_size": 5, "m": 4} and cfg.label_smoothing == 0.1
    digits = dataset_spec("digits")  # its registry defaults fill the rest
    assert (cfg.image_size, cfg.width) == (digits.info.image_size, digits.training.width)
    assert resolve({"dataset": "cifar10"}).image_size == 32
    with pytest.raises(ConfigError, match="unknown setting 'lrr'"):
        resolve(parse_overrides(["lrr=1"]))
    with pytest.raises(ConfigError, match="expects"):
        resolve(parse_overrides(["epochs=many"]))
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        read_recipe(tmp_path / "missing.toml")


def test_lr_schedule() -> None:
    f = [
        lr_factor(s, 10, 4, warmup_epochs=1, schedule="step", milestones=[2, 3]) for s in range(40)
    ]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert f[20] == pytest.approx(0.1) and f[35] == pytest.approx(0.01)
    c = [lr_factor(s, 10, 4, warmup_epochs=0, schedule="cosine") for s in range(40)]
    assert c[0] == 1.0 and c[20] == pytest.approx(0.5) and c[39] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(c))


def _tiny_checkpoint(path: Path, arch: str = "resnet26") -> None:
    from robustlr.models import create_model

    opts = {"small_input": True, "width": 0.25}
    model = create_model(arch, num_classes=10, **opts)
    save_checkpoint(
        {
            "model": model.state_dict(),
            "arch": arch,
            "model_options": opts,
            "num_classes": 10,
            "epoch": 1,
            "step": 3,
        },
        path,
    )


class _Payload:
    """Unpickling this would create a marker file: a safe load must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_checkpoint(path: Path, marker: Path) -> None:
    torch.save(
        {
            "model": {},
            "arch": "resnet26",
            "model_options": {},
            "num_classes": 10,
            "epoch": 1,
            "payload": _Payload(marker),
        },
        path,
    )


def test_checkpoint_safety(tmp_path) -> None:
    good = tmp_path / "good.pt"
    _tiny_checkpoint(good)
    model = load_model(good)
    assert not model.training
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic writer left no temp file
    with pytest.raises(CheckpointError, match="is for arch 'resnet26', not 'resnet18'"):
        load_checkpoint(good, arch="resnet18")

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _pickled_checkpoint(evil, marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(evil)
    assert not marker.exists()

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as z:
        z.writestr("a", "b")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "x.zip")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a robustlr checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_one_epoch_cpu_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        train, [*FAST, "--epochs", "1", "--seed", "1", "--set", "max_steps_per_epoch=6"]
    )
    assert result.exit_code == 0, result.output
    assert "image size 16, width 0.25, 1 epochs, batch 64" in result.output
    runs = tmp_path / "runs"
    run = runs / (runs / "latest").read_text().strip()
    assert run.name.startswith("resnet26-regular-")
    rows = _rows(run / "metrics.csv")
    assert len(rows) == 1
    row = rows[0]
    for col in ("epoch", "lr", "loss", "train_acc", "val_acc", "images_per_s", "seconds"):
        assert math.isfinite(float(row[col])), col
    assert int(row["images"]) == 6 * 64
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "resnet26" and config["epochs"] == 1 and config["seed"] == 1
    ckpt = load_checkpoint(run / "checkpoint.pt", arch="resnet26")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 6
    for key in ("optimizer", "scheduler", "scaler", "rng", "config", "model_options"):
        assert key in ckpt
    assert (run / "best.pt").is_file()
    model = load_model(run / "best.pt")
    assert not model.training
    # --resume without --out continues the run runs/latest points at, here for one more epoch
    more = CliRunner().invoke(train, ["--resume", "--epochs", "2"])
    assert more.exit_code == 0, more.output
    assert "resuming after epoch 1" in more.output
    assert [r["epoch"] for r in _rows(run / "metrics.csv")] == ["1", "2"]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 12


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path) -> None:
    out = tmp_path / "run"
    # epoch 1 trains normally; at epoch 2 the step schedule multiplies the lr by 1e31
    proc = invoke_cli(
        "train",
        *FAST,
        "--epochs",
        "3",
        "--out",
        str(out),
        "--lr",
        "0.01",
        "--set",
        "max_steps_per_epoch=3",
        "--set",
        'schedule="step"',
        "--set",
        "milestones=[1]",
        "--set",
        "gamma=1e31",
        "--set",
        "warmup_epochs=0",
        cwd=tmp_path,
    )
    assert proc.exit_code == 1, proc.output
    assert "Traceback" not in proc.output
    assert "loss became" in proc.output and "last good checkpoint is kept" in proc.output
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert len(_rows(out / "metrics.csv")) == 1
    # a plain lr of 1e30 dies in the first epoch: no checkpoint at all, still a clean message
    proc = invoke_cli(
        "train",
        *FAST,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r2"),
        "--set",
        "lr=1e30",
        "--set",
        "max_steps_per_epoch=3",
        cwd=tmp_path,
    )
    assert proc.exit_code == 1 and "Traceback" not in proc.output
    assert "loss became" in proc.output


@pytest.mark.slow
def test_bad_input_gives_one_line_error(tmp_path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    _tiny_checkpoint(good / "checkpoint.pt", arch="resnet26")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    _pickled_checkpoint(evil / "checkpoint.pt", marker)
    cases = {
        "missing data": (
            [
                "train",
                "--arch",
                "resnet26",
                "--dataset",
                "cifar10",
                "--data",
                str(tmp_path / "nope.npz"),
            ],
            "does not exist",
        ),
        "unknown dataset": (["train", "--arch", "resnet26", "--dataset", "svhn"], "svhn"),
        "unknown arch": (["train", "--arch", "resnet27"], "unknown arch 'resnet27'"),
        "other arch": (
            ["train", "--arch", "resnet18", "--resume", "--out", str(good)],
            "is for arch 'resnet26', not 'resnet18'",
        ),
        "corrupt": (["train", "--resume", "--out", str(corrupt)], "corrupt"),
        "pickled": (["train", "--resume", "--out", str(evil)], "refused"),
        "no arch": (["train"], "--arch is required"),
        "bad set": (["train", "--arch", "resnet26", "--set", "nonsense=1"], "unknown setting"),
        "bad device": (["train", "--arch", "resnet26", "--device", "gpu"], "auto, cpu, cuda"),
        "no runs": (["train", "--resume"], "no runs found"),
    }
    for name, (args, message) in cases.items():
        result = invoke_cli(*args, cwd=tmp_path)
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), (name, result.output)
        assert message in lines[0], (name, result.output)
    # through the installed entry point too (a real process, its stderr)
    proc = run_cli("train", "--resume", "--out", str(evil), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("Error:"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "refused" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


class _FlipHalfHook(BatchHook):
    """Trains on the batch plus its mirror image and reports accuracy on the mirrored half."""

    metric_names = ("mirror_acc",)

    def __init__(self) -> None:
        self.calls = 0
        self.seeds: list[int] = []

    def transform(self, model, x, y, ctx):
        self.calls += 1
        assert model.training and not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.seeds.append(int(torch.randint(0, 10**6, (1,), generator=ctx.generator)))
        return HookedBatch(torch.cat([x, x.flip(-1)]), torch.cat([y, y]))

    def metrics(self, logits, batch, ctx):
        y = batch.y
        half = y.shape[0] // 2
        correct = (logits[half:].argmax(1) == y[half:]).sum()
        return {"mirror_acc": (correct, half)}


def test_batch_hook_and_image_folder_training(tmp_path) -> None:
    root = image_folder(tmp_path / "imgs", corrupt=False)
    cfg = resolve(
        {
            "arch": "resnet26",
            "dataset": "imagefolder",
            "data": str(root),
            "image_size": 16,
            "width": 0.25,
            "small_input": True,
            "epochs": 1,
            "batch_size": 4,
            "val_fraction": 0.2,
            "out": str(tmp_path / "run"),
        }
    )
    hook = _FlipHalfHook()
    events: list[object] = []
    result = train_engine(cfg, on_event=events.append, hook=hook)
    assert hook.calls == 2  # 8 training images, batch 4
    rows = _rows(result.run_dir / "metrics.csv")
    assert int(rows[0]["images"]) == 16  # the hook doubled every batch
    assert 0.0 <= float(rows[0]["mirror_acc"]) <= 1.0
    assert result.best_val_acc == pytest.approx(float(rows[0]["val_acc"]), abs=1e-4)  # one epoch
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("StepEnded") == 2 and "EpochEnded" in kinds
    # the per-step generator is seeded from (seed, epoch, step): a rerun draws the same values
    again = _FlipHalfHook()
    train_engine(resolve(cfg.to_dict(), {"out": str(tmp_path / "run2")}), hook=again)
    assert again.seeds == hook.seeds


def test_progress_renderer_on_a_terminal(tmp_path) -> None:
    import io

    from rich.console import Console

    from robustlr.cli.train import _Renderer

    buf = io.StringIO()
    renderer = _Renderer(Console(file=buf, force_terminal=True, width=120))
    cfg = resolve({"arch": "resnet26"}).to_dict()
    renderer(RunStarted(tmp_path, cfg, 0, 0, 1, 2, 1, "cpu", 1000, 10, 2))
    renderer(EpochStarted(1, 1, 2, 0))
    renderer(StepEnded(1, 1, 2, 2.3, 0.1, 64))
    renderer(StepEnded(1, 2, 2, 2.2, 0.1, 64))
    row = {
        "epoch": 1,
        "lr": 0.1,
        "loss": 2.2,
        "train_acc": 0.1,
        "val_acc": 0.2,
        "images_per_s": 50.0,
        "seconds": 2.5,
    }
    renderer(EpochEnded(1, 1, row))
    renderer(RunFinished(tmp_path, 1, 0.2))
    out = buf.getvalue()
    assert "epoch 1/1" in out and "val acc 0.2000" in out and "best val acc 0.2000" in out


def test_best_checkpoint_is_the_highest_held_out_accuracy_and_ties_go_to_the_later_epoch():
    accuracies = [0.50, 0.90, 0.85, 0.90, 0.88]
    best, chosen = None, None
    for epoch, accuracy in enumerate(accuracies, 1):
        if is_new_best(accuracy, best):
            best, chosen = accuracy, epoch
    assert (best, chosen) == (0.90, 4)
    assert not is_new_best(0.89, 0.90) and is_new_best(0.1, None)
