"""The error raised for bad data input (unknown dataset, missing path, corrupt file)."""

from __future__ import annotations

from robustlr.errors import UserError


class DataError(UserError):
    """Bad data input; the message says what is wrong and where (the CLI shows it as one line)."""
