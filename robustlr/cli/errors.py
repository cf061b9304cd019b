"""Bad input, translated once: any :class:`robustlr.errors.UserError` raised while a command
runs becomes ``Error: <one line>`` on stderr and exit code 2 (never a traceback).

Every command is declared with :data:`command` (a ``click.command`` whose class does the
translation), so the rule holds however the command is invoked (``robustlr ...``, ``python -m
robustlr``, click's test runner).
"""

from __future__ import annotations

import functools
from typing import Any

import click

from robustlr.errors import UserError, one_line


class UsageFailure(UserError):
    """Bad input noticed by the CLI itself (e.g. a missing required option)."""


class BadInput(click.ClickException):
    """What a UserError becomes at the CLI boundary: ``Error: <message>``, exit code 2."""

    exit_code = 2


class UserErrorCommand(click.Command):
    """A click command that turns a :class:`UserError` into :class:`BadInput`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise BadInput(one_line(exc)) from None


class UserErrorGroup(click.Group):
    """A click group whose sub-commands get the same translation."""

    command_class = UserErrorCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise BadInput(one_line(exc)) from None


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
]
