"""Errors the CLI reports as one line with exit code 2 (bad input, not a bug)."""

from __future__ import annotations


class UsageFailure(Exception):
    """Bad input from the user: shown as ``Error: <message>`` and exit code 2."""
