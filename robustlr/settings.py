"""The one ``--set KEY=VALUE`` grammar of every command.

KEY is a dotted path into nested tables (``lr``, ``model.kernel_size``, ``train.epochs``);
VALUE is a TOML value (``1e-3``, ``true``, ``[30, 60]``, ``"text"``), a bare word being taken
as a string. ``robustlr train``/``advtrain`` set keys of the training config, ``robustlr run``
keys of the recipe.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from typing import Any

from robustlr.errors import UserError


class SettingError(UserError):
    """A ``--set`` that is not ``KEY=VALUE`` or that sets a key inside a non-table."""


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (1e-3, true, [30, 60], "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(pair: str) -> tuple[tuple[str, ...], Any]:
    """``"model.kernel_size=5"`` -> ``(("model", "kernel_size"), 5)``; SettingError if bad."""
    key, sep, text = pair.partition("=")
    parts = tuple(p.strip() for p in key.split("."))
    if not sep or not all(parts):
        raise SettingError(f"--set expects key=value (a dotted key, e.g. model.m=4), got {pair!r}")
    return parts, parse_value(text.strip())


def apply_assignments(data: dict[str, Any], pairs: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with every ``KEY=VALUE`` of ``pairs`` set (tables created as needed;
    tables along the way are copied, ``data`` is not changed)."""
    out = dict(data)
    for pair in pairs:
        parts, value = parse_assignment(pair)
        table = out
        for part in parts[:-1]:
            child = table.get(part, {})
            if not isinstance(child, dict):
                raise SettingError(f"--set {'.'.join(parts)}: {part!r} is not a table")
            table[part] = dict(child)
            table = table[part]
        table[parts[-1]] = value
    return out
