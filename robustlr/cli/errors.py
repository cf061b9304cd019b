"""Errors the CLI reports as one line with exit code 2 (bad input, not a bug)."""

from __future__ import annotations


class UsageFailure(Exception):
    """Bad input from the user: shown as ``Error: <message>`` and exit code 2."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line (DataLoader workers wrap errors in a traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    if len(lines) > 1 and ": " in last:
        last = last.split(": ", 1)[1]
    return last
