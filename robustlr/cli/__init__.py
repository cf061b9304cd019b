"""The ``robustlr`` command line (click + rich). The CLI is the only layer that prints.

Each command lives in its own module of this package and is registered here.
"""

from __future__ import annotations

import logging
import sys

import click

from robustlr import __version__
from robustlr.cli.advtrain import advtrain
from robustlr.cli.bench import bench
from robustlr.cli.bench_model import model as bench_model
from robustlr.cli.errors import group
from robustlr.cli.eval import eval_command
from robustlr.cli.models import models
from robustlr.cli.report import check, report
from robustlr.cli.run import run
from robustlr.cli.train import train
from robustlr.cli.viz import viz


@group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robustlr")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """robustlr: adversarial robustness of Local Relation Networks (Hu et al., ICCV 2019)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


bench.add_command(bench_model)
for command in (train, advtrain, eval_command, report, check, run, models, bench, viz):
    cli.add_command(command)


def main() -> None:
    """Entry point: bad input ends with a one-line error and exit code 2, not a traceback
    (every command translates :class:`robustlr.errors.UserError`, see ``cli/errors.py``)."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
