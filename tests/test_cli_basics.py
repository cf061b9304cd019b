"""The command line: version, help, entry points, bench op, one-line errors."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from click.testing import CliRunner

from robustlr import __version__
from robustlr.cli import cli
from robustlr.resources import kernel_source, resource_dir


def test_version_and_help():
    runner = CliRunner()
    assert __version__ in runner.invoke(cli, ["--version"]).output
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "bench" in result.output


@pytest.mark.slow  # a subprocess (the CLI's import alone is ~3 s of CPU)
def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "robustlr", "--help"], capture_output=True, text=True, check=True
    )
    assert "Local Relation Networks" in out.stdout


@pytest.mark.slow  # times every op variant (minutes on a loaded 2-core machine)
def test_bench_op_runs_and_writes_ratios(tmp_path):
    path = tmp_path / "op.csv"
    result = CliRunner().invoke(
        cli,
        ["bench", "op", "--device", "cpu", "--shapes", "16x6x6,24x8x8/s2", "--batch-size", "2",
         "--repeats", "1", "--kernel-size", "3", "--threads", "1", "--cpu-time",
         "--csv", str(path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "speedup" in result.output
    rows = list(csv.DictReader(path.open()))
    variants = {"lr-cpu", "lr-reference", "lr-unfold", "conv3x3", "dwconv7x7"}
    assert {r["variant"] for r in rows} == variants  # the compiled backend beside the reference
    assert {r["case"] for r in rows} == {"16x6x6/s1", "24x8x8/s2"}
    assert all(float(r["total_ms"]) > 0 for r in rows)


@pytest.mark.slow  # a subprocess (the CLI's import alone is ~3 s of CPU)
def test_bad_bench_shape_is_one_line_error_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "robustlr", "bench", "op", "--shapes", "12x5", "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "bad op shape" in out.stderr


def test_shipped_directories_are_found():
    for name in ("kernels", "attacks", "recipes"):
        assert resource_dir(name).is_dir()
    assert any(resource_dir("kernels").glob("*.cu"))
    assert "__global__" in kernel_source(next(resource_dir("kernels").glob("*.cu")).name)
