"""``robustlr viz``: figures of a trained model (the learnt geometric priors, Figure 4)."""

from __future__ import annotations

from pathlib import Path

import click

from robustlr.checkpoint import load_model
from robustlr.cli.errors import UsageFailure, group


@group("viz")
def viz() -> None:
    """Figures of a trained model."""


@viz.command("geo-prior")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Checkpoint of a model with local relation layers (an lrnet).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("geo_prior.png"),
    show_default=True,
    help="PNG file to write.",
)
def geo_prior(checkpoint: Path, out: Path) -> None:
    """The learnt geometric priors after softmax, one panel per stage (the paper's Figure 4)."""
    from robustlr.report.plots import plot_geo_priors

    model = load_model(checkpoint)
    try:
        path = plot_geo_priors(model, out, title=f"Learnt geometric priors, {checkpoint}")
    except ValueError as exc:
        raise UsageFailure(f"{checkpoint}: {exc}") from None
    click.echo(f"wrote {path}")
