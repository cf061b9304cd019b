"""``robustlr models``: parameter and FLOP counts of every registered arch vs the paper."""

from __future__ import annotations

import csv
import io
import json

import click
from rich.console import Console
from rich.table import Table

from robustlr.cli.errors import command
from robustlr.models import PAPER_SIZES, list_models, model_size

COLUMNS = (
    "arch",
    "params_m",
    "gflops",
    "paper_params_m",
    "paper_gflops",
    "params_ratio",
    "gflops_ratio",
    "gflops_vs_resnet",
)
HEADERS = {
    "params_m": "params (M)",
    "gflops": "GFLOPs",
    "paper_params_m": "paper params",
    "paper_gflops": "paper GFLOPs",
    "params_ratio": "params / paper",
    "gflops_ratio": "GFLOPs / paper",
    "gflops_vs_resnet": "GFLOPs / ResNet",
}


def size_rows(
    input_size: int, num_classes: int, small_input: bool = False
) -> list[dict[str, object]]:
    """One row per registered arch (the paper's archs first, in its order): our counts, the
    paper's, ours / paper, and for lrnetN its GFLOPs / resnetN's."""
    names = list_models()
    ordered = [a for a in PAPER_SIZES if a in names] + [a for a in names if a not in PAPER_SIZES]
    options = {"small_input": True} if small_input else {}
    sizes = {
        a: model_size(a, input_size=input_size, num_classes=num_classes, **options) for a in ordered
    }
    rows = []
    for arch, size in sizes.items():
        row = {name: size[name] for name in COLUMNS[:5]}
        row["params_ratio"] = _ratio(size["params_m"], size["paper_params_m"])
        row["gflops_ratio"] = _ratio(size["gflops"], size["paper_gflops"])
        resnet = "resnet" + arch.removeprefix("lrnet")
        baseline = sizes[resnet]["gflops"] if arch.startswith("lrnet") and resnet in sizes else None
        row["gflops_vs_resnet"] = _ratio(size["gflops"], baseline)
        rows.append(row)
    return rows


def _ratio(ours: object, paper: object) -> float | None:
    return None if paper is None else float(ours) / float(paper)  # type: ignore[arg-type]


def _fmt(value: object, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


_DIGITS = {"params_m": 3, "gflops": 3, "paper_params_m": 1, "paper_gflops": 1}


@command("models")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--input-size",
    type=click.IntRange(min=8),
    default=224,
    show_default=True,
    help="Square input side in pixels (the paper's numbers are at 224).",
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Classifier outputs (the paper's numbers are for 1000).",
)
@click.option(
    "--small-input", is_flag=True, help="Count the small-image stem (no stem downsampling)."
)
def models(fmt: str, input_size: int, num_classes: int, small_input: bool) -> None:
    """Params (millions) and GFLOPs (1e9 multiply-adds) of every registered arch vs the paper."""
    rows = size_rows(input_size, num_classes, small_input)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row[c], _DIGITS.get(c, 4)) for c in COLUMNS])
        click.echo(buffer.getvalue(), nl=False)
    else:
        table = Table(title=f"Model sizes at {input_size}x{input_size}, {num_classes} classes")
        for name in COLUMNS:
            table.add_column(HEADERS.get(name, name), justify="left" if name == "arch" else "right")
        for row in rows:
            table.add_row(*[_fmt(row[c], _DIGITS.get(c, 3)) for c in COLUMNS])
        Console().print(table)
