"""The ``--model SPEC`` options of ``robustlr eval`` and ``robustlr check`` (a model robustlr
did not train: TorchScript, torch.export, ``package.module:factory``, ``timm:NAME``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from robustlr.cli.errors import UsageFailure
from robustlr.cli.params import split_list
from robustlr.data import DATASETS
from robustlr.eval.external import (
    DEFAULT_TRAIN_MODE,
    TRAIN_MODES,
    ExternalOptions,
    parse_model_args,
)

# the options below, by parameter name (all go with --model only)
MODEL_ONLY = ("model_args", "weights", "mean", "std", "grayscale", "dataset", "image_size",
              "name", "train_mode")  # fmt: skip


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in split_list([value]))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers, e.g. 0.5,0.5,0.5") from None


def external_model_options(command: Any) -> Any:
    """Add ``--model`` and the options that describe an external model and its data."""
    options = [
        click.option(
            "--model",
            "model_spec",
            default=None,
            help="A model robustlr did not train: a TorchScript or torch.export (.pt2) file, "
            "package.module:factory, or timm:NAME (instead of --checkpoint).",
        ),
        click.option(
            "--model-arg",
            "model_args",
            multiple=True,
            help="KEY=VALUE keyword argument of the factory / timm.create_model (repeatable).",
        ),
        click.option(
            "--weights",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="A state_dict for a factory or timm model (loaded with weights_only=True).",
        ),
        click.option(
            "--mean",
            callback=_floats,
            default=None,
            help="Per-channel mean the model expects (e.g. 0.5,0.5,0.5): wraps it in a "
            "normaliser so that attacks act on [0, 1] pixels.",
        ),
        click.option("--std", callback=_floats, default=None, help="Per-channel std (see --mean)."),
        click.option(
            "--grayscale",
            is_flag=True,
            help="The model takes one channel: feed it the mean of the dataset's channels.",
        ),
        click.option(
            "--dataset",
            type=click.Choice(DATASETS),
            default=None,
            help="Dataset the model is evaluated on [default: digits].",
        ),
        click.option(
            "--image-size",
            type=click.IntRange(min=1),
            default=None,
            help="Image side the model takes [default: the dataset's].",
        ),
        click.option(
            "--name",
            default=None,
            help="Run name: results go to RUNS/NAME/ [default: from the SPEC].",
        ),
        click.option(
            "--train-mode",
            type=click.Choice(TRAIN_MODES),
            default=None,
            help=f"How the model was trained; decides its Table 9 columns [default: "
            f"{DEFAULT_TRAIN_MODE}].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def external_options(
    model_spec: str | None, checkpoint: Path | None, data: Any, values: dict[str, Any]
) -> ExternalOptions | None:
    """The ``ExternalOptions`` of ``--model`` (None without it); UsageFailure when
    model-only options come without ``--model`` or ``--model`` with ``--checkpoint``."""
    given = [k for k in MODEL_ONLY if values.get(k) not in (None, (), False)]
    if model_spec is None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageFailure(f"{flags} describe(s) a --model; a checkpoint records its own")
        return None
    if checkpoint is not None:
        raise UsageFailure("give --checkpoint or --model, not both")
    chosen = {k: values[k] for k in given}
    if "model_args" in chosen:
        chosen["model_args"] = parse_model_args(chosen["model_args"])
    return ExternalOptions(spec=model_spec, data=str(data) if data is not None else None, **chosen)
