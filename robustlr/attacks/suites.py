"""Attack suites: TOML files of ``[[attack]]`` tables, shipped in ``attacks/`` or anywhere."""

from __future__ import annotations

import tomllib
from pathlib import Path

from robustlr.attacks.spec import AttackSpec
from robustlr.resources import resource_dir


def list_suites() -> list[str]:
    """Names of the shipped suites (``attacks/<name>.toml``)."""
    return sorted(p.stem for p in resource_dir("attacks").glob("*.toml"))


def suite_path(name_or_path: str | Path) -> Path:
    """A shipped suite's file by name, or the given path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    shipped = resource_dir("attacks") / f"{path.stem}.toml"
    if shipped.is_file():
        return shipped
    raise ValueError(
        f"no attack suite {str(name_or_path)!r}: give a .toml file or one of {list_suites()}"
    )


def load_suite(name_or_path: str | Path) -> list[AttackSpec]:
    """The attacks of a suite, in file order."""
    path = suite_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    entries = data.get("attack")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: a suite needs at least one [[attack]] table")
    specs = []
    for i, entry in enumerate(entries, 1):
        try:
            specs.append(AttackSpec.from_dict(entry))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: attack #{i}: {exc}") from None
    return specs
