"""The one base class of errors caused by bad user input.

Every such error of the library (a bad config, dataset, checkpoint, recipe, results file,
attack spec or device) derives from :class:`UserError`; the CLI translates it, in one place,
into ``Error: <message>`` and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong (shown as one line)."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line (DataLoader workers wrap errors in a traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    if len(lines) > 1 and ": " in last:
        last = last.split(": ", 1)[1]
    return last
