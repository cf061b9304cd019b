"""Bad input, translated once: any :class:`robustlr.errors.UserError` raised while a command
runs becomes ``Error: <one line>`` on stderr and exit code 2 (never a traceback).

Every command is declared with :data:`command` (a ``click.command`` whose class does the
translation), so the rule holds however the command is invoked (``robustlr ...``, ``python -m
robustlr``, click's test runner).
"""

from __future__ import annotations

import errno
import functools
from typing import Any

import click

from robustlr.errors import UserError, one_line


class UsageFailure(UserError):
    """Bad input noticed by the CLI itself (e.g. a missing required option)."""


class BadInput(click.ClickException):
    """What a UserError becomes at the CLI boundary: ``Error: <message>``, exit code 2."""

    exit_code = 2


# output faults that are the machine's, not a bug: one line, exit 2
OUTPUT_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
}


def output_fault(exc: OSError) -> str:
    """The one line shown for an output fault (a full disk while writing ``exc.filename``)."""
    where = f" while writing {exc.filename}" if exc.filename else ""
    return (
        f"{OUTPUT_FAULTS[exc.errno]}{where}; files written completely before are kept "
        "(checkpoints are replaced only whole): free space and run the command again"
    )


def _translate(exc: BaseException) -> BadInput | None:
    if isinstance(exc, UserError):
        return BadInput(one_line(exc))
    if isinstance(exc, OSError) and exc.errno in OUTPUT_FAULTS:
        return BadInput(output_fault(exc))
    return None


class UserErrorCommand(click.Command):
    """A click command that turns a :class:`UserError` (or an output fault such as a full
    disk) into :class:`BadInput`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as exc:
            bad = _translate(exc)
            if bad is None:
                raise
            raise bad from None


class UserErrorGroup(click.Group):
    """A click group whose sub-commands get the same translation."""

    command_class = UserErrorCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as exc:
            bad = _translate(exc)
            if bad is None:
                raise
            raise bad from None


command = functools.partial(click.command, cls=UserErrorCommand)
group = functools.partial(click.group, cls=UserErrorGroup)

__all__ = [
    "BadInput",
    "UsageFailure",
    "UserErrorCommand",
    "UserErrorGroup",
    "command",
    "group",
    "one_line",
    "output_fault",
]
