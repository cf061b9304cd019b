"""``robustlr report`` (Table 9, paired tests, sanity checks, plots) and ``robustlr check``
(live sanity checks of one model)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from robustlr.attacks.spec import AttackSpec, format_eps, parse_eps
from robustlr.cli.errors import UsageFailure, command
from robustlr.cli.external import external_model_options, external_options
from robustlr.cli.params import checkpoint_options, device_option, int_list, split_list
from robustlr.device import resolve_device
from robustlr.eval.external import open_external
from robustlr.eval.session import open_checkpoint
from robustlr.report.checks import CheckResult, checks_frame
from robustlr.report.files import (
    BROKEN_BY_CSV,
    CHECKS_CSV,
    FORMATS,
    PAIRS_CSV,
    PLOTS_DIR,
    report_file,
)
from robustlr.report.pipeline import make_report
from robustlr.report.robustbench import ROBUSTBENCH_DIR, ROBUSTBENCH_FORMAT, write_robustbench
from robustlr.report.table9 import ReportSettings, Table9
from robustlr.report.writers import rich_table_data, write_frame
from robustlr.runs import check_output_path, find_checkpoint

STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _eps_option(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_eps(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--eps") from None


def print_table9(console: Console, table: Table9) -> None:
    """Render the Table 9 rich table and its notes."""
    data = rich_table_data(table)
    rich = Table(title=str(data["title"]))
    for i, name in enumerate(data["columns"]):  # type: ignore[arg-type]
        rich.add_column(name, justify="left" if i == 0 or name == "runs" else "right")
    for row in data["rows"]:  # type: ignore[union-attr]
        rich.add_row(*row)
    console.print(rich)
    for note in table.notes:
        console.print(f"  note: {note}", highlight=False)


def print_checks(console: Console, checks: list[CheckResult], title: str = "Sanity checks") -> None:
    """Render checks as a rich table, status coloured."""
    rich = Table(title=title)
    for name in ("check", "status", "subject", "numbers", "explanation"):
        rich.add_column(name, overflow="fold")
    for c in checks:
        style = STATUS_STYLE[c.status]
        rich.add_row(c.check, f"[{style}]{c.status.upper()}[/]", c.subject, c.numbers, c.message)
    console.print(rich)


def print_pairs(console: Console, pairs: pd.DataFrame) -> None:
    """Render the comparisons: one sentence each (difference of means over seeds, its 95%
    interval and bootstrap p-value)."""
    if pairs.empty:
        console.print("No two networks share a filled cell: no comparisons.")
        return
    console.print("[bold]LR-Net against ResNet (difference of means over seeds)[/]")
    for text in pairs["sentence"]:
        console.print(f"  {text}", highlight=False)


@command("report")
@click.argument("results", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--runs",
    "runs_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Read every eval.csv under this directory (when no RESULTS files are given).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Report file [default: RUNS/table9.csv, or ./table9.csv with RESULTS files].",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice((*FORMATS, ROBUSTBENCH_FORMAT)),
    default="csv",
    show_default=True,
    help=f"csv also writes its Markdown twin (.md); {CHECKS_CSV}, {PAIRS_CSV} and "
    f"{BROKEN_BY_CSV} (which attack broke the images) go beside it. "
    f"{ROBUSTBENCH_FORMAT}: the csv report plus one RobustBench-style model-info JSON per "
    f"model in {ROBUSTBENCH_DIR}/ beside it.",
)
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the PNG plots [default: plots/ next to the report].",
)
@click.option("--no-plots", is_flag=True, help="Write no plots.")
@click.option("--eps", default=None, help="Report eps, e.g. 16/255 [default: 16/255 if present].")
@click.option("--dataset", default=None, help="Dataset to report (needed when several).")
@click.option("--split", default=None, help="Split to report [default: test, else val].")
@click.option(
    "--attack-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Use only PGD rows with this many steps [default: the strongest matching row].",
)
@click.option(
    "--target-policy",
    type=click.Choice(["random", "least-likely"]),
    default="random",
    show_default=True,
    help="Target policy of the targeted cells.",
)
@click.option(
    "--run",
    "run_names",
    multiple=True,
    help="Consider only these runs (repeatable or comma-separated).",
)
def report(
    results: tuple[Path, ...],
    runs_dir: Path,
    out: Path | None,
    fmt: str,
    plots_dir: Path | None,
    no_plots: bool,
    eps: str | None,
    dataset: str | None,
    split: str | None,
    attack_steps: int | None,
    target_policy: str,
    run_names: tuple[str, ...],
) -> None:
    """Table 9 (adversarial clean / targeted / untargeted, regular clean) from eval results,
    with Wilson intervals, McNemar paired tests, sanity checks and plots."""
    settings = ReportSettings(
        eps=_eps_option(eps),
        dataset=dataset,
        split=split,
        attack_steps=attack_steps,
        target_policy=target_policy,
        runs=tuple(split_list(run_names)),
    )
    table_fmt = "csv" if fmt == ROBUSTBENCH_FORMAT else fmt
    if out is None:
        out = report_file(Path(".") if results else runs_dir, table_fmt)
    check_output_path(out, "--out", directory=False)  # before any work
    if not no_plots and plots_dir is not None:
        check_output_path(plots_dir, "--plots")
    made = make_report(
        settings,
        out,
        results=results,
        runs_dir=runs_dir,
        fmt=table_fmt,
        plots_dir=None if no_plots else (plots_dir or out.parent / PLOTS_DIR),
    )
    if fmt == ROBUSTBENCH_FORMAT:
        made.written += write_robustbench(made.table, out.parent / ROBUSTBENCH_DIR)
    console = Console()
    print_table9(console, made.table)
    print_pairs(console, made.pairs)
    print_checks(console, made.checks)
    console.print("wrote " + ", ".join(str(p) for p in made.written), highlight=False)


@command("check")
@checkpoint_options
@external_model_options
@click.option("--data", "data_root", default=None, help="Data path [default: the run's].")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option(
    "--limit", type=click.IntRange(min=2), default=200, show_default=True, help="Images used."
)
@click.option("--eps", default="16/255", show_default=True, help="L-inf eps of the checks.")
@click.option(
    "--steps",
    multiple=True,
    default=("10,20,50,100",),
    show_default=True,
    help="Step counts of the step sweep (repeatable or comma-separated).",
)
@click.option("--no-bf16", is_flag=True, help="Skip the bf16-vs-fp32 attack.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@device_option()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write check_eval.csv, checks.csv and an adversarial image grid here.",
)
def check(
    checkpoint: Path | None,
    runs_root: Path,
    data_root: str | None,
    split: str,
    limit: int,
    eps: str,
    steps: tuple[str, ...],
    no_bf16: bool,
    batch_size: int,
    device: str,
    out_dir: Path | None,
    model_spec: str | None,
    **model_options: object,
) -> None:
    """Live sanity checks of one model (a checkpoint, or --model SPEC): eval-mode determinism,
    step and eps sweeps, bf16 vs fp32, targeted vs untargeted, zero gradients. Exit code 1
    when a check fails."""
    from robustlr.report.live_checks import check_model

    eps_value = _eps_option(eps)
    assert eps_value is not None
    step_counts = tuple(int_list(steps, "--steps"))
    if not step_counts or min(step_counts) < 1:
        raise click.BadParameter("give positive step counts, e.g. 10,20,50", param_hint="--steps")
    if out_dir is not None:
        check_output_path(out_dir, "--out")
    dev = resolve_device(device)
    external = external_options(model_spec, checkpoint, data_root, model_options)
    if external is not None:  # checks write no rows: the run directory is left as it is
        target = open_external(external, runs_root, torch.device("cpu"), write=False)
        path = external.spec
    else:
        try:
            path = find_checkpoint(checkpoint, runs_root)
        except FileNotFoundError as exc:
            raise UsageFailure(f"{exc}; pass --checkpoint") from None
        target = open_checkpoint(path, torch.device("cpu"))  # eval's discovery and image loading
    model = target.model
    dataset = target.meta["dataset"]
    if not dataset:
        raise UsageFailure(f"{path} does not record its dataset")
    images, labels, _ = target.load_images(split, data_root, limit)
    if len(labels) < 2:
        raise UsageFailure(f"{dataset} {split} has fewer than 2 images")
    meta = {
        "run": target.meta["run"],
        "arch": target.meta["arch"],
        "train_mode": target.meta["train_mode"],
        "dataset": dataset,
        "split": split,
    }
    device = str(dev)
    live = check_model(
        model,
        images,
        labels,
        eps=eps_value,
        steps=step_counts,
        low_precision=None if no_bf16 else "bf16",
        batch_size=batch_size,
        device=device,
        meta=meta,
    )
    console = Console()
    shown = live.rows[
        ["attack", "eps", "steps", "precision", "accuracy", "accuracy_low", "accuracy_high"]
    ]
    console.print(
        f"{meta['arch']} on {len(images)} {dataset} {split} images, eps {format_eps(eps_value)}",
        highlight=False,
    )
    console.print(shown.to_string(index=False), highlight=False)
    print_checks(console, live.checks, title=f"Live checks of {path}")
    if out_dir is not None:
        from robustlr.report.plots import plot_image_grid

        write_frame(live.rows, out_dir / "check_eval.csv")
        write_frame(checks_frame(live.checks), out_dir / CHECKS_CSV)
        spec = AttackSpec("pgd-untargeted", eps=eps_value, steps=min(step_counts))
        from robustlr.attacks import attack

        x = images[:8].to(device)
        x_adv = attack(model.to(device), x, labels[:8].to(device), spec)
        plot_image_grid(x, x_adv, out_dir / "adversarial_examples.png")
        console.print(f"wrote {out_dir}/check_eval.csv, checks.csv, adversarial_examples.png")
    if any(c.status == "fail" for c in live.checks):
        sys.exit(1)
