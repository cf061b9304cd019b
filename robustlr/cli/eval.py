"""``robustlr eval``: attack a checkpoint (or, with ``--model``, any model) and append Table
9-ready rows to ``eval.csv``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from robustlr.attacks.spec import (
    ATTACK_NAMES,
    NORMS,
    OPTIONAL_OPTIONS,
    PRECISIONS,
    AttackSpec,
    format_eps,
    parse_eps,
    parse_number,
)
from robustlr.attacks.suites import load_suite
from robustlr.cli.errors import UsageFailure, command
from robustlr.cli.external import external_model_options, external_options
from robustlr.cli.params import checkpoint_options, device_option
from robustlr.distributed import close_distributed, init_distributed
from robustlr.eval.external import ExternalOptions, open_external
from robustlr.eval.session import evaluate_checkpoint, open_checkpoint, with_clean
from robustlr.runs import EVAL_CSV, OUTCOMES, check_output_path, find_checkpoint


def _eps_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_eps(value, norm="l2")  # >= 0 here; each attack's norm bounds it further
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _radius_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """--eps: a number >= 0 such as 16/255 or 1.5 (an L-inf eps must lie in [0, 1]: the spec
    refuses it otherwise, with one line)."""
    if value is None:
        return None
    try:
        number = parse_number(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if number < 0:
        raise click.BadParameter(f"{value!r} is negative")
    return number


def build_specs(
    attacks: tuple[str, ...], suite: str | None, overrides: dict[str, Any]
) -> list[AttackSpec]:
    """Specs from --attack names and/or a suite; CLI values override each spec's own (an
    option is applied to the attacks that use it, and refused when none does)."""
    specs: list[AttackSpec] = []
    try:
        if suite:
            specs += load_suite(suite)
        specs += [AttackSpec(name) for name in attacks]
        overrides = {k: v for k, v in overrides.items() if v is not None}
        specs = [s.with_options(**overrides) for s in specs]
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    if not specs:
        raise click.UsageError("name at least one --attack or a --suite")
    for key in overrides:
        if key in OPTIONAL_OPTIONS and not any(key in s.info.takes for s in specs):
            option = "--" + key.replace("_", "-")
            raise UsageFailure(f"{option} is not used by {', '.join(s.name for s in specs)}")
    return specs


@command("eval")
@checkpoint_options
@external_model_options
@click.option(
    "--attack",
    "attacks",
    multiple=True,
    type=click.Choice(ATTACK_NAMES),
    help="Attack to run (repeatable).",
)
@click.option("--suite", default=None, help="A suite name from attacks/ or a .toml file.")
@click.option(
    "--eps",
    callback=_radius_option,
    default=None,
    help="e.g. 16/255 or 0.0627 (L-inf, in [0, 1]); 1.5 (L2).",
)
@click.option("--step-size", callback=_eps_option, default=None, help="e.g. 1/255.")
@click.option("--steps", type=click.IntRange(min=1), default=None)
@click.option("--restarts", type=click.IntRange(min=1), default=None)
@click.option(
    "--queries",
    type=click.IntRange(min=1),
    default=None,
    help="Query budget per image of a black-box attack (square, hopskipjump).",
)
@click.option("--norm", type=click.Choice(NORMS), default=None)
@click.option("--seed", type=int, default=None, help="Seed of random targets and starts.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate the first N test images only.",
)
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Data path [default: the one the run was trained with].",
)
@click.option(
    "--allow-other-data",
    is_flag=True,
    help="Evaluate on data that differs from what the checkpoint was trained on (the rows "
    "then name the data used) instead of refusing it.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@device_option()
@click.option(
    "--out",
    "out_csv",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Results CSV to append to [default: eval.csv in the run directory].",
)
@click.option(
    "--save-examples",
    "examples_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Save per-example outcomes (npz) in this directory.",
)
def eval_command(
    checkpoint, runs_root, attacks, suite, eps, step_size, steps, restarts, queries, norm, seed,
    precision, limit, split, data, allow_other_data, batch_size, device, out_csv, examples_dir,
    model_spec, **model_options,
):  # fmt: skip
    """Evaluate a checkpoint (or --model: any model) under white-box attacks (the run's test
    images; --dataset's for --model)."""
    if model_spec is not None and allow_other_data:
        raise UsageFailure(
            "--allow-other-data is for a --checkpoint (data that differs from its training "
            "data); a --model is evaluated on --dataset's data: drop it"
        )
    external = external_options(model_spec, checkpoint, data, model_options)
    overrides = {
        "eps": eps, "step_size": step_size, "steps": steps, "restarts": restarts,
        "queries": queries, "norm": norm, "seed": seed, "precision": precision,
    }  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if v is not None}
    specs = with_clean(build_specs(attacks, suite, overrides))  # the rows evaluation writes
    dist_ctx = init_distributed(device)  # a world of one unless under torchrun
    try:
        _evaluate(dist_ctx, specs, checkpoint, runs_root, limit, split, data, allow_other_data,
                  batch_size, out_csv, examples_dir, external)  # fmt: skip
    except BaseException:
        close_distributed(dist_ctx)
        raise
    close_distributed(dist_ctx, completed=True)


def _evaluate(
    dist_ctx, specs, checkpoint, runs_root, limit, split, data, allow_other_data, batch_size,
    out_csv, examples_dir, external: ExternalOptions | None = None,
) -> None:  # fmt: skip
    dev = dist_ctx.device
    console = Console(quiet=not dist_ctx.is_main)
    if external is not None:  # rank 0 writes the run's record; every rank loads the model
        target = open_external(external, runs_root, dev, write=dist_ctx.is_main)
        path, run_dir = external.spec, target.run_dir
    else:
        try:
            path = find_checkpoint(checkpoint, runs_root)
        except FileNotFoundError as exc:
            raise UsageFailure(str(exc)) from None
        run_dir = path.parent
    out_csv = out_csv or run_dir / EVAL_CSV
    examples_dir = examples_dir or out_csv.parent / OUTCOMES
    check_output_path(out_csv, "--out", directory=False)  # before any work
    check_output_path(examples_dir, "--save-examples")
    if external is not None:  # its data is --dataset's: there is no recorded identity to differ
        images, labels, indices = target.load_images(split, data, limit)
    else:
        target = open_checkpoint(path, dev)
        images, labels, indices = target.load_images(
            split, data, limit, allow_other_data=allow_other_data
        )
    dataset = target.meta["dataset"]
    console.print(
        f"[bold]eval[/] {target.meta['arch']} ({target.meta['train_mode'] or '?'}) from {path}: "
        f"{len(labels)} {dataset} {split} images on {dev}"
        + (f" x {dist_ctx.world_size} processes" if dist_ctx.distributed else "")
    )
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn(),
    )  # fmt: skip
    started = time.perf_counter()
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as progress:  # fmt: skip
        tasks = {id(s): progress.add_task(s.describe(), total=len(labels), rate=0.0) for s in specs}
        spec_start: dict[int, float] = {}

        def on_batch(spec: AttackSpec, done: int) -> None:
            spec_start.setdefault(id(spec), time.perf_counter())
            elapsed = max(time.perf_counter() - spec_start[id(spec)], 1e-9)
            done *= dist_ctx.world_size  # this rank's share, scaled to the whole set
            progress.update(tasks[id(spec)], completed=done, rate=done / elapsed)

        rows = evaluate_checkpoint(
            target, specs, images=images, labels=labels, indices=indices, split=split,
            out_csv=out_csv, batch_size=batch_size, device=dev, examples_dir=examples_dir,
            on_batch=on_batch, dist_ctx=dist_ctx,
        )  # fmt: skip
    if not dist_ctx.is_main:
        return

    table = Table(title=f"{target.meta['arch']} · {len(labels)} images · {split}")
    for col in ("attack", "eps", "steps", "target", "acc %", "95% CI", "hit %"):
        table.add_column(col, justify="right", no_wrap=True)
    for spec, row in zip(specs, rows, strict=True):
        table.add_row(
            spec.name,
            format_eps(spec.eps, spec.norm) if spec.name != "clean" else "-",
            str(row["steps"] or "-"),
            row["target_policy"] or "-",
            f"{row['accuracy']:.2f}",
            f"[{row['accuracy_low']:.1f}, {row['accuracy_high']:.1f}]",
            f"{row['target_success']:.1f}" if row["target_success"] != "" else "-",
        )
    console.print(table)
    console.print(f"appended {len(rows)} rows to {out_csv} ({time.perf_counter() - started:.1f} s)")
