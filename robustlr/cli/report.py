"""``robustlr report`` (Table 9, paired tests, sanity checks, plots) and ``robustlr check``
(live sanity checks of one model)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from robustlr.attacks.spec import AttackSpec, format_eps, parse_eps
from robustlr.checkpoint import CheckpointError, build_model, load_checkpoint
from robustlr.cli.errors import UsageFailure
from robustlr.report.checks import CheckResult, checks_frame, run_checks
from robustlr.report.pairs import pair_table
from robustlr.report.results import ResultsError, collect_results
from robustlr.report.table9 import ReportSettings, Table9, build_table9
from robustlr.report.writers import FORMATS, SUFFIXES, rich_table_data, write_frame, write_report

STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
CHECKPOINT_NAMES = ("best.pt", "checkpoint.pt")


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
    """Render the paired tests."""
    if pairs.empty:
        console.print("No two networks share a filled cell: no paired tests.")
        return
    rich = Table(title="Paired tests (McNemar)")
    for name in ("cell", "networks", "accuracy", "only a / only b", "p", "significant", "note"):
        rich.add_column(name, overflow="fold")
    for _, p in pairs.iterrows():
        tested = pd.notna(p["p_value"])
        rich.add_row(
            p["cell"],
            f"{p['network_a']} vs {p['network_b']}",
            f"{p['accuracy_a']:.1f} vs {p['accuracy_b']:.1f}",
            f"{int(p['only_a'])} / {int(p['only_b'])}" if tested else "",
            f"{p['p_value']:.3g}" if tested else "",
            ("yes" if p["significant"] else "no") if tested else "",
            p["note"],
        )
    console.print(rich)


@click.command("report")
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
    type=click.Choice(FORMATS),
    default="csv",
    show_default=True,
    help="csv also writes its Markdown twin (.md); checks.csv and pairs.csv go beside it.",
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
@click.option("--run", "run_names", multiple=True, help="Consider only these runs (repeatable).")
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
        runs=run_names,
    )
    try:
        frame = collect_results(results, runs_dir)
        table = build_table9(frame, settings)
    except ResultsError as exc:
        raise UsageFailure(str(exc)) from None
    pairs = pair_table(table)
    checks = run_checks(table.results, table)
    if out is None:
        out = (Path(".") if results else runs_dir) / f"table9{SUFFIXES[fmt]}"
    written = write_report(table, out, fmt, pairs, checks)
    console = Console()
    print_table9(console, table)
    print_pairs(console, pairs)
    print_checks(console, checks)
    if not no_plots:
        from robustlr.report.plots import report_plots, run_geo_prior_plots

        directory = plots_dir or out.parent / "plots"
        written += report_plots(
            table.results[table.results["run_key"].isin(set(table.runs.values()))],
            directory,
            table.eps,
        )
        written += run_geo_prior_plots(table.runs, directory, CHECKPOINT_NAMES)
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


def _load_images(
    dataset: str, split: str, root: str | None, limit: int, image_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from robustlr.data import DataError, load

    try:
        ds = load(dataset, split, root, image_size=image_size, augment=False)
    except DataError as exc:
        raise UsageFailure(str(exc)) from None
    count = min(limit, len(ds))
    if count < 2:
        raise UsageFailure(f"{dataset} {split} has fewer than 2 images")
    items = [ds[i] for i in range(count)]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


@click.command("check")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Model checkpoint [default: best.pt (else checkpoint.pt) of runs/latest].",
)
@click.option("--dataset", default=None, help="Dataset [default: the checkpoint's].")
@click.option("--data", "data_root", default=None, help="Data path (not needed for digits).")
@click.option("--split", default="test", show_default=True, help="Split to attack.")
@click.option(
    "--limit", type=click.IntRange(min=2), default=200, show_default=True, help="Images used."
)
@click.option("--eps", default="16/255", show_default=True, help="L-inf eps of the checks.")
@click.option(
    "--steps",
    default="10,20,50,100",
    show_default=True,
    help="Step counts of the step sweep (comma-separated).",
)
@click.option("--no-bf16", is_flag=True, help="Skip the bf16-vs-fp32 attack.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write check_eval.csv, checks.csv and an adversarial image grid here.",
)
def check(
    checkpoint: Path | None,
    dataset: str | None,
    data_root: str | None,
    split: str,
    limit: int,
    eps: str,
    steps: str,
    no_bf16: bool,
    batch_size: int,
    device: str,
    out_dir: Path | None,
) -> None:
    """Live sanity checks of one model: eval-mode determinism, step and eps sweeps, bf16 vs
    fp32, targeted vs untargeted, zero gradients. Exit code 1 when a check fails."""
    from robustlr.report.live_checks import check_model

    eps_value = _eps_option(eps)
    assert eps_value is not None
    try:
        step_counts = tuple(int(s) for s in steps.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(
            f"{steps!r} is not a list of integers", param_hint="--steps"
        ) from None
    if not step_counts or min(step_counts) < 1:
        raise click.BadParameter("give positive step counts, e.g. 10,20,50", param_hint="--steps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    checkpoint = checkpoint or _latest_checkpoint()
    try:
        payload = load_checkpoint(checkpoint)
        model = build_model(payload).eval()
    except CheckpointError as exc:
        raise UsageFailure(str(exc)) from None
    config: dict[str, Any] = payload.get("config") or {}
    dataset = dataset or config.get("dataset")
    if not dataset:
        raise UsageFailure(f"{checkpoint} does not say its dataset: pass --dataset")
    images, labels = _load_images(
        dataset, split, data_root or config.get("data"), limit, config.get("image_size")
    )
    meta = {
        "run": checkpoint.parent.name,
        "arch": payload["arch"],
        "train_mode": config.get("mode", ""),
        "dataset": dataset,
        "split": split,
    }
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
        f"{payload['arch']} on {len(images)} {dataset} {split} images, eps {format_eps(eps_value)}",
        highlight=False,
    )
    console.print(shown.to_string(index=False), highlight=False)
    print_checks(console, live.checks, title=f"Live checks of {checkpoint}")
    if out_dir is not None:
        from robustlr.report.plots import plot_image_grid

        write_frame(live.rows, out_dir / "check_eval.csv")
        write_frame(checks_frame(live.checks), out_dir / "checks.csv")
        spec = AttackSpec("pgd-untargeted", eps=eps_value, steps=min(step_counts))
        from robustlr.attacks import attack

        x = images[:8].to(device)
        x_adv = attack(model.to(device), x, labels[:8].to(device), spec)
        plot_image_grid(x, x_adv, out_dir / "adversarial_examples.png")
        console.print(f"wrote {out_dir}/check_eval.csv, checks.csv, adversarial_examples.png")
    if any(c.status == "fail" for c in live.checks):
        sys.exit(1)


def _latest_checkpoint() -> Path:
    from robustlr.train.rundir import latest_run

    try:
        run = latest_run("runs")
    except FileNotFoundError as exc:
        raise UsageFailure(f"{exc}; pass --checkpoint") from None
    for name in CHECKPOINT_NAMES:
        if (run / name).is_file():
            return run / name
    raise UsageFailure(f"{run} has no {' or '.join(CHECKPOINT_NAMES)}; pass --checkpoint")
