"""``robustlr advtrain``: adversarial training, the paper's targeted multi-step PGD by default."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from robustlr.attacks.spec import parse_number
from robustlr.cli.errors import UsageFailure, command
from robustlr.cli.train import F, build_config, run_training, training_options
from robustlr.train.adversarial import AdversarialTraining


def _number(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """An eps-like option: ``16/255`` or ``0.0627``."""
    if value is None:
        return None
    try:
        return parse_number(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def adversarial_options(f: F) -> F:
    """The threat model of adversarial training (defaults: the paper's, see AdversarialTraining)."""
    options = [
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="PGD steps per training batch [default: 16]."),
        click.option("--eps", callback=_number, default=None,
                     help="Perturbation budget, e.g. 16/255 [default: 16/255]."),
        click.option("--step-size", callback=_number, default=None,
                     help="PGD step size, e.g. 2/255 [default: 2/255]."),
        click.option("--target", type=click.Choice(["random", "least-likely", "none"]),
                     default=None, help="Target policy [default: random wrong class]."),
        click.option("--norm", type=click.Choice(["linf", "l2"]), default=None),
        click.option("--mix", type=float, default=None,
                     help="Share of clean images in each batch [default: 0.5; 0 = adversarial "
                     "only]."),
        click.option("--logit-pairing", type=float, default=None,
                     help="Weight of adversarial logit pairing [default: 0]."),
        click.option("--clean-start-prob", type=float, default=None,
                     help="Probability of starting an attack from the clean image [default: 0]."),
        click.option("--attack-precision", type=click.Choice(["fp32", "bf16", "fp16"]),
                     default=None, help="Autocast of the attack's passes [default: fp32]."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


_ADVERSARIAL_FIELDS = {
    "steps": "steps",
    "eps": "eps",
    "step_size": "step_size",
    "target": "target",
    "norm": "norm",
    "mix": "mix",
    "logit_pairing": "logit_pairing",
    "clean_start_prob": "clean_start_prob",
    "attack_precision": "precision",
}


@command()
@training_options
@adversarial_options
def advtrain(**params: Any) -> None:
    """Adversarial training: targeted multi-step PGD (the paper's protocol by default)."""
    chosen = {
        field: params.pop(name)
        for name, field in _ADVERSARIAL_FIELDS.items()
        if params.get(name) is not None
    }
    for name in _ADVERSARIAL_FIELDS:
        params.pop(name, None)
    if chosen and params.get("resume"):
        raise UsageFailure("a resumed run keeps its threat model: drop the attack options")
    if chosen:
        params["overrides"] = (
            *(params.get("overrides") or ()),
            *(f"adversarial.{k}={v!r}" if isinstance(v, str) else f"adversarial.{k}={v}"
              for k, v in chosen.items()),
        )  # fmt: skip
    config, resume = build_config("adversarial", params)
    settings = AdversarialTraining(**config.adversarial)  # resolved and checked with the config
    Console().print(f"adversarial training: {settings.describe()}")
    run_training(config, resume)
