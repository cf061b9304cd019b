"""The ``robustlr`` command line (click). The only module that prints."""

from __future__ import annotations

import click

from robustlr import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robustlr")
def cli() -> None:
    """robustlr: adversarial robustness of Local Relation Networks."""


def main() -> None:
    cli()
