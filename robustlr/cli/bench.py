"""``robustlr bench``: throughput of the op, the models and the attacks on this device."""

from __future__ import annotations

import csv
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from robustlr.bench.op import LRNET26_CASES, OpCase, OpSettings, bench_op, summarize
from robustlr.cli.params import cpu_time_option, threads_option
from robustlr.ops import BACKENDS


@click.group()
def bench() -> None:
    """Measure the op, the models and the attacks on this device (ratios side by side)."""


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return device


def _parse_cases(text: str | None) -> tuple[OpCase, ...]:
    if not text:
        return LRNET26_CASES
    try:
        return tuple(OpCase.parse(part) for part in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shapes") from None


@bench.command("op")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Batch size [default: 16 on CPU, 32 on CUDA].",
)
@click.option(
    "--shapes",
    default=None,
    help="Comma-separated CxHxW[/sS] cases [default: LR-Net-26 stage shapes].",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
)
@click.option("--kernel-size", type=click.IntRange(min=1), default=7, show_default=True)
@click.option(
    "--m",
    "m",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Channels per aggregation group.",
)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    help="Force robustlr's backend [default: automatic; the reference backend is measured "
    "beside any other].",
)
@threads_option()
@cpu_time_option("op")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every measurement to this CSV file.",
)
def bench_op_command(
    device, batch_size, shapes, dtype, kernel_size, m, repeats, backend, threads, cpu_time, csv_path
):
    """Time and peak memory of the local relation op vs unfold, 3x3 conv and 7x7 depthwise."""
    device = _resolve_device(device)
    if kernel_size % 2 == 0:
        raise click.BadParameter("must be odd", param_hint="--kernel-size")
    settings = OpSettings(
        batch=batch_size or (32 if device.startswith("cuda") else 16),
        device=device,
        dtype=dtype,
        kernel_size=kernel_size,
        m=m,
        repeats=repeats,
        backend=backend,
        threads=threads,
        cpu_time=cpu_time,
    )
    console = Console()
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    console.print(
        f"[bold]bench op[/] on {name} ({threads or torch.get_num_threads()} threads"
        f"{', CPU time' if cpu_time else ''}), batch "
        f"{settings.batch}, {dtype}, K={kernel_size}, m={m}, median of {repeats} after warm-up"
    )
    try:
        with console.status("measuring...") as status:
            results = bench_op(
                _parse_cases(shapes),
                settings,
                on_result=lambda r: status.update(f"measured {r.case} {r.variant}"),
            )
    except RuntimeError as exc:  # e.g. a forced backend that is not installed
        raise click.ClickException(str(exc)) from None

    variants = list(dict.fromkeys(r.variant for r in results))
    table = Table(
        title=f"forward+backward ms (peak extra MB); ours = {variants[0]}",
        caption="speedup, mem saving: unfold / ours; x ref: reference / ours; /dw7x7, /3x3: "
        "ours / that conv; mem/in: ours' peak extra memory / its inputs' size",
    )
    short = {
        variants[0]: "ours",
        "lr-reference": "reference",
        "lr-unfold": "unfold",
        "conv3x3": "3x3",
        "dwconv7x7": "dw7x7",
    }
    with_ref = "lr-reference" in variants[1:]
    columns = ["case", *(short[v] for v in variants), "speedup", "mem saving"]
    columns += ["x ref"] * with_ref + ["/dw7x7", "/3x3", "mem/in"]
    for col in columns:
        table.add_column(col, justify="right")
    for row in summarize(results):
        table.add_row(
            row["case"],
            *(f"{row[f'{v}_ms']:.1f} ({row[f'{v}_mb']:.0f})" for v in variants),
            f"{row['speedup_vs_unfold']:.2f}",
            f"{row['memory_saving_vs_unfold']:.1f}",
            *([f"{row['speedup_vs_reference']:.2f}"] if with_ref else []),
            f"{row['vs_dwconv7x7']:.2f}",
            f"{row['vs_conv3x3']:.2f}",
            f"{row['memory_vs_input']:.2f}",
        )
    console.print(table)
    if csv_path:
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(vars(results[0])))
            writer.writeheader()
            writer.writerows(vars(r) for r in results)
        console.print(f"wrote {csv_path}")
