"""Locate the data directories that ship beside the code: kernels/, attacks/, recipes/.

In a source checkout (and an editable install) they sit at the repository root, one level above
the package; in a wheel they are installed inside the package as ``robustlr/_data/<name>``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_KNOWN = ("kernels", "attacks", "recipes")


def resource_dir(name: str) -> Path:
    """Return the directory holding the shipped ``name`` files (kernels, attacks or recipes)."""
    if name not in _KNOWN:
        raise ValueError(f"unknown resource directory {name!r}; expected one of {_KNOWN}")
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"robustlr's {name}/ directory was not found next to the package ({_PACKAGE_DIR}); "
        "reinstall robustlr"
    )


def kernel_source(filename: str) -> str:
    """Read one CUDA source or header from the kernels directory."""
    return (resource_dir("kernels") / filename).read_text()
