"""``robustlr train``: regular training (the options are shared with ``advtrain``).

``training_options`` adds the common options to a click command; ``build_config`` turns them
into a :class:`robustlr.train.TrainConfig` (defaults < recipe < options < --set) and
``run_training`` runs the engine, rendering its events with rich and turning bad input into a
one-line ``Error:`` (exit code 2).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from robustlr.cli.errors import UsageFailure, command
from robustlr.cli.params import device_option
from robustlr.data import DATASETS
from robustlr.runs import check_output_path, latest_run
from robustlr.train import (
    CheckpointSaved,
    EpochEnded,
    EpochStarted,
    NonFiniteLossError,
    RunFinished,
    RunStarted,
    StepEnded,
    TrainConfig,
    TrainEvent,
    TrainResult,
    parse_overrides,
    read_recipe,
    resolve,
    resume_config,
)
from robustlr.train import train as train_engine

F = TypeVar("F", bound=Callable[..., Any])

# CLI option name -> TrainConfig field
_OPTION_FIELDS = {
    "arch": "arch",
    "dataset": "dataset",
    "data": "data",
    "download": "download",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "width": "width",
    "image_size": "image_size",
    "small_input": "small_input",
    "out": "out",
    "seed": "seed",
    "deterministic": "deterministic",
    "device": "device",
    "workers": "num_workers",
}


def training_options(f: F) -> F:
    """The options every training command takes (``train`` and ``advtrain``)."""
    options = [
        click.option("--arch", default=None, help="Model name (see `robustlr models`)."),
        click.option(
            "--dataset",
            default=None,
            help=f"Dataset: {', '.join(DATASETS)} [default: digits, embedded].",
        ),
        click.option(
            "--data",
            default=None,
            help="Dataset location: torchvision root, .npz file, or ImageFolder root.",
        ),
        click.option(
            "--download",
            is_flag=True,
            default=None,
            help="Let torchvision download cifar/mnist into --data.",
        ),
        click.option("--epochs", type=int, default=None),
        click.option(
            "--batch-size",
            type=int,
            default=None,
            help="Global batch, split across torchrun processes.",
        ),
        click.option(
            "--lr",
            type=float,
            default=None,
            help="Peak learning rate [default: 0.1 x batch / 256].",
        ),
        click.option(
            "--width",
            type=float,
            default=None,
            help="Channel width multiplier.",
        ),
        click.option("--image-size", type=int, default=None),
        click.option(
            "--small-input/--no-small-input",
            default=None,
            help="Small-image stem (no stem downsampling) for 32x32-class inputs.",
        ),
        click.option(
            "--out", default=None, help="Run directory [default: runs/<arch>-<mode>-<timestamp>]."
        ),
        click.option("--seed", type=int, default=None),
        click.option(
            "--deterministic",
            is_flag=True,
            default=None,
            help="Deterministic kernels (bitwise-reproducible on the CPU).",
        ),
        click.option(
            "--resume",
            is_flag=True,
            default=False,
            help="Continue the run in --out (default: runs/latest) from checkpoint.pt.",
        ),
        device_option(default=None),
        click.option(
            "--workers",
            type=int,
            default=None,
            help="DataLoader worker processes.",
        ),
        click.option(
            "--recipe",
            type=click.Path(dir_okay=False),
            default=None,
            help="Training recipe TOML ([train] table).",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override any config key (TOML value), e.g. --set label_smoothing=0.1 "
            "or --set model.kernel_size=5.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_config(mode: str, params: dict[str, Any]) -> tuple[TrainConfig, bool]:
    """(config, resume) from the parsed ``training_options`` of a ``mode`` command.

    A resumed run keeps its saved mode and threat model: resuming it with the other command
    is refused. Raises a :class:`robustlr.errors.UserError` on bad input.
    """
    explicit = {
        field: params[name]
        for name, field in _OPTION_FIELDS.items()
        if params.get(name) is not None
    }
    sets = parse_overrides(params.get("overrides") or ())
    if params.get("resume"):
        try:
            run_dir = Path(explicit["out"]) if "out" in explicit else latest_run()
        except FileNotFoundError as exc:
            raise UsageFailure(f"{exc}; pass --out RUN_DIR") from None
        return resume_config(run_dir, {**explicit, **sets}, mode=mode), True
    if "arch" not in explicit and "arch" not in sets and not params.get("recipe"):
        raise UsageFailure("--arch is required (e.g. --arch resnet26; see `robustlr models`)")
    recipe = read_recipe(params["recipe"]) if params.get("recipe") else {}
    return resolve(recipe, explicit, sets, {"mode": mode}), False


class _Renderer:
    """Turns engine events into rich output: progress bars on a terminal, one line per epoch
    otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None

    def __call__(self, event: TrainEvent) -> None:
        c = self.console
        if isinstance(event, RunStarted):
            cfg = event.config
            c.print(
                f"train {cfg['arch']} on {cfg['dataset']} ({event.train_images} train / "
                f"{event.val_images} val images): image size {cfg['image_size']}, width "
                f"{cfg['width']}, {event.epochs} epochs, batch {cfg['batch_size']}, lr "
                f"{cfg['lr'] if cfg['lr'] is not None else 0.1 * cfg['batch_size'] / 256:g}, "
                f"{cfg['schedule']} schedule, {event.num_params / 1e6:.2f}M params, "
                f"device {event.device} x{event.world_size}",
                highlight=False,
            )
            c.print(f"run directory: {event.run_dir}", highlight=False)
            if event.start_epoch or event.start_step:
                c.print(
                    f"resuming after epoch {event.start_epoch}, step {event.start_step}",
                    highlight=False,
                )
            if c.is_terminal:
                self.progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[ips]:>7.1f} img/s  loss {task.fields[loss]:.3f}"),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=c,
                    transient=True,
                )
                self.progress.start()
        elif isinstance(event, EpochStarted) and self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(
                f"epoch {event.epoch}/{event.epochs}",
                total=event.steps,
                completed=event.start_step,
                ips=0.0,
                loss=math.nan,
            )
        elif isinstance(event, StepEnded) and self.progress is not None:
            task = self.progress.tasks[-1]
            ips = task.speed * event.images if task.speed else 0.0
            self.progress.update(self.task, advance=1, loss=event.loss, ips=ips)
        elif isinstance(event, EpochEnded):
            r = event.row
            c.print(
                f"epoch {event.epoch}/{event.epochs}  loss {r['loss']:.4f}  train acc "
                f"{r['train_acc']:.4f}  val acc {r['val_acc']:.4f}  lr {r['lr']:.4g}  "
                f"{r['images_per_s']:.1f} img/s  {r['seconds']:.1f}s",
                highlight=False,
            )
        elif isinstance(event, CheckpointSaved) and event.best:
            pass  # best.pt is reported in the final summary
        elif isinstance(event, RunFinished):
            self.close()
            best = "n/a" if event.best_val_acc is None else f"{event.best_val_acc:.4f}"
            c.print(f"done: best val acc {best}; checkpoints in {event.run_dir}", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def run_training(config: TrainConfig, resume: bool) -> TrainResult:
    """Run the engine (it trains the way ``config`` says) with rich rendering; divergence ->
    exit 1."""
    check_output_path(config.out or config.runs_root, "--out" if config.out else "--runs")
    renderer = _Renderer(Console(file=sys.stdout, soft_wrap=True))
    try:
        return train_engine(config, on_event=renderer, resume=resume)
    except NonFiniteLossError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        renderer.close()


@command()
@training_options
def train(**params: Any) -> None:
    """Train a model (regular training; embedded digits data unless --dataset/--data)."""
    config, resume = build_config("regular", params)
    run_training(config, resume)
