"""Option conventions shared by every command (one vocabulary across the CLI).

* ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked by the library:
  :func:`robustlr.device.check_device_name`).
* Lists: an option that takes several values is repeatable *and* accepts comma-separated
  values, e.g. ``--steps 10 --steps 20`` or ``--steps 10,20``.
* ``--set KEY=VALUE``: repeatable; VALUE in TOML syntax (``1e-3``, ``true``, ``[30, 60]``,
  ``"text"``), a bare word being a string; KEY dotted for nested tables (``model.kernel_size``,
  ``train.epochs``). Parsed by :func:`robustlr.settings.parse_assignment`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from robustlr.device import DEVICE_HELP
from robustlr.runs import BEST, CHECKPOINT


def device_option(default: str | None = "auto") -> Any:
    """The ``--device`` option (default ``auto``; None lets a recipe or saved run decide)."""
    shown = f" [default: {default}]" if default is not None else " [default: auto]"
    return click.option("--device", default=default, help=f"{DEVICE_HELP}.{shown}")


def checkpoint_options(command: Any) -> Any:
    """``--checkpoint`` (a checkpoint or a run directory) and ``--runs`` (where the newest run
    is looked for when it is not given), as :func:`robustlr.runs.find_checkpoint` takes them."""
    command = click.option(
        "--runs",
        "runs_root",
        type=click.Path(path_type=Path),
        default=Path("runs"),
        show_default=True,
        help="Where runs live (to find the newest one).",
    )(command)
    return click.option(
        "--checkpoint",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Checkpoint or run directory [default: the newest run's {BEST}, else its "
        f"{CHECKPOINT}].",
    )(command)


def threads_option() -> Any:
    """The benches' ``--threads`` option (intra-op threads while measuring)."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="Intra-op threads (torch.set_num_threads) [default: PyTorch's].",
    )


def cpu_time_option(what: str) -> Any:
    """The benches' ``--cpu-time`` option; ``what`` names the unit timed ("op", "step")."""
    return click.option(
        "--cpu-time",
        is_flag=True,
        help="Time CPU runs in process CPU time, not wall time (for a shared machine; with "
        f"--threads 1 it counts each {what}'s own work).",
    )


def split_list(values: Iterable[str] | None) -> list[str]:
    """The items of a list option given repeated and/or comma-separated: ('a,b', 'c') ->
    ['a', 'b', 'c'] (blanks dropped)."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def int_list(values: Iterable[str] | None, option: str) -> list[int]:
    """:func:`split_list` as integers; click.BadParameter names ``option`` otherwise."""
    items = split_list(values)
    try:
        return [int(v) for v in items]
    except ValueError:
        bad = ", ".join(items)
        raise click.BadParameter(f"{bad!r} are not integers", param_hint=option) from None
