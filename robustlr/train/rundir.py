"""Run directories: ``runs/<arch>-<mode>-<timestamp>`` and the ``latest`` pointer beside them."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

LATEST = "latest"


def new_run_dir(runs_root: str | Path, arch: str, mode: str) -> Path:
    """A fresh, not yet existing ``<runs_root>/<arch>-<mode>-<YYYYmmdd-HHMMSS>`` path."""
    base = Path(runs_root) / f"{arch}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_latest(run_dir: str | Path) -> Path:
    """Point ``<parent>/latest`` (a one-line text file) at ``run_dir``; written atomically."""
    run_dir = Path(run_dir)
    pointer = run_dir.parent / LATEST
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=run_dir.parent)
    with os.fdopen(fd, "w") as f:
        f.write(run_dir.name + "\n")
    os.replace(tmp, pointer)
    return pointer


def latest_run(runs_root: str | Path = "runs") -> Path:
    """The run directory ``<runs_root>/latest`` points at; FileNotFoundError if none."""
    pointer = Path(runs_root) / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no runs found ({pointer} does not exist)")
    run = Path(runs_root) / pointer.read_text().strip()
    if not run.is_dir():
        raise FileNotFoundError(f"{pointer} points at {run}, which does not exist")
    return run
