"""``robustlr bench model``: training-step throughput of models side by side on one device."""

from __future__ import annotations

import csv
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from robustlr.bench.model import bench_models
from robustlr.cli.params import cpu_time_option, threads_option
from robustlr.models import list_models
from robustlr.ops import BACKENDS

CSV_COLUMNS = (
    "arch",
    "device",
    "input_size",
    "batch_size",
    "small_input",
    "params_m",
    "step_ms",
    "step_ms_min",
    "step_ms_max",
    "images_per_s",
    "ratio",
    "reference",
    "peak_mem_mb",
    "mem_method",
    "repeats",
    "clock",
    "threads",
)


def _parse_archs(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    archs = [a.strip() for a in value.split(",") if a.strip()]
    if not archs:
        raise click.BadParameter("give at least one arch", ctx=ctx, param=param)
    unknown = [a for a in archs if a not in list_models()]
    if unknown:
        raise click.BadParameter(
            f"unknown arch {', '.join(unknown)}; choose from {', '.join(list_models())}",
            ctx=ctx,
            param=param,
        )
    return archs


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@click.command("model")
@click.option(
    "--archs",
    default="lrnet26,resnet26,resnet50",
    show_default=True,
    callback=_parse_archs,
    help="Comma-separated archs; ratios are to the first ResNet named.",
)
@click.option("--input-size", type=click.IntRange(min=8), default=224, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Timed steps; the median is reported.",
)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option(
    "--width",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Width multiplier of every model.",
)
@click.option(
    "--small-input/--no-small-input",
    default=None,
    help="Small-image stem (default: when --input-size < 64).",
)
@click.option("--channels-last", is_flag=True, help="Model and input in channels_last.")
@threads_option()
@cpu_time_option("step")
@click.option(
    "--lr-backend",
    type=click.Choice(BACKENDS),
    default=None,
    help="Local relation backend of LR-Nets (default: automatic).",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the rows to this CSV file.",
)
def model(
    archs: list[str],
    input_size: int,
    batch_size: int,
    device: str,
    repeats: int,
    warmup: int,
    width: float,
    small_input: bool | None,
    channels_last: bool,
    threads: int | None,
    cpu_time: bool,
    lr_backend: str | None,
    csv_path: Path | None,
) -> None:
    """Training-step throughput (forward + backward + SGD step) of each arch on one device."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available", param_hint="--device")
    options: dict[str, object] = {"width": width}
    if lr_backend is not None:
        if not all(a.startswith("lrnet") for a in archs):
            raise click.BadParameter(
                "applies to LR-Nets only: name only lrnet archs", param_hint="--lr-backend"
            )
        options["lr_backend"] = lr_backend
    import torch

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = bench_models(
            archs,
            input_size,
            batch_size,
            device,
            repeats=repeats,
            warmup=warmup,
            small_input=small_input,
            channels_last=channels_last,
            cpu_time=cpu_time,
            **options,
        )
    finally:
        torch.set_num_threads(saved_threads)
    first = rows[0]
    table = Table(
        title=f"Training step on {first['device']}: {input_size}x{input_size}, batch "
        f"{batch_size}, median of {repeats} (ratio to {first['reference']}), "
        f"{first['threads']} threads, {first['clock']} clock"
    )
    for name in ("arch", "params (M)", "step (ms)", "images/s", "ratio", "peak mem (MB)"):
        table.add_column(name, justify="left" if name == "arch" else "right")
    for row in rows:
        table.add_row(
            str(row["arch"]),
            _fmt(row["params_m"]),
            _fmt(row["step_ms"]),
            _fmt(row["images_per_s"]),
            _fmt(row["ratio"]),
            _fmt(row["peak_mem_mb"]),
        )
    console = Console()
    console.print(table)
    console.print(f"peak memory: {first['mem_method']}")
    if csv_path is not None:
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        console.print(f"wrote {csv_path}")
