"""``robustlr run RECIPE``: a whole study (train, advtrain, eval, report) from one recipe file."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from robustlr.attacks.spec import AttackSpec
from robustlr.cli.errors import UsageFailure, command
from robustlr.cli.report import print_checks, print_pairs, print_table9
from robustlr.cli.train import _Renderer
from robustlr.report.writers import report_file
from robustlr.runs import check_output_path
from robustlr.study import (
    Stage,
    StageStatus,
    default_out_dir,
    load_recipe,
    run_study,
    study_status,
)
from robustlr.train import NonFiniteLossError

STATE_STYLE = {"done": "green", "pending": "yellow"}


class _EvalProgress:
    """One progress bar per attack of the running eval stage (terminal only)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.tasks: dict[int, int] = {}

    def __call__(self, stage: Stage, spec: AttackSpec, done: int, total: int) -> None:
        if not self.console.is_terminal:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        if id(spec) not in self.tasks:
            self.tasks[id(spec)] = self.progress.add_task(spec.describe(), total=total)
        self.progress.update(self.tasks[id(spec)], completed=done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress, self.tasks = None, {}


def print_stages(console: Console, statuses: list[tuple[Stage, StageStatus]], title: str) -> None:
    table = Table(title=title)
    for name in ("#", "stage", "status", "detail"):
        table.add_column(name)
    for i, (stage, status) in enumerate(statuses, 1):
        style = STATE_STYLE.get(status.state, "")
        table.add_row(str(i), stage.name, f"[{style}]{status.state}[/]", status.detail)
    console.print(table)


@command("run")
@click.argument("recipe")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Study directory [default: runs/<recipe name>].",
)
@click.option("--dry-run", is_flag=True, help="List the stages and their status; run nothing.")
@click.option("--data", default=None, help="Dataset location (same as --set data.path=PATH).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a recipe value (TOML syntax), e.g. --set train.epochs=2 --set eval.limit=100.",
)
@click.option("--until", default=None, help="Stop after this stage, e.g. 'train resnet26'.")
def run(
    recipe: str,
    out_dir: Path | None,
    dry_run: bool,
    data: str | None,
    overrides: tuple[str, ...],
    until: str | None,
) -> None:
    """Run a study from RECIPE (a .toml file or a shipped name such as table9-digits): train
    and adversarially train each network, evaluate every run, write DIR/table9.csv, .md and
    plots/. Completed stages are skipped, so a killed study resumes where it stopped."""
    if data is not None:
        overrides = (*overrides, f"data.path={data!r}")
    console = Console(file=sys.stdout, soft_wrap=True)
    study = load_recipe(recipe, overrides)
    out = out_dir or default_out_dir(study)
    check_output_path(out, "--out")  # before any work
    statuses = study_status(study, out)
    names = [stage.name for stage, _ in statuses]
    if until is not None and until not in names:
        raise UsageFailure(f"no stage {until!r}; stages: {', '.join(names)}")
    title = f"study {study.name} in {out}"
    if dry_run:
        print_stages(console, statuses, title)
        return
    console.print(f"[bold]{title}[/]: {study.description}", highlight=False)
    renderer, eval_progress = _Renderer(console), _EvalProgress(console)

    def on_stage(stage: Stage, what: str, status: StageStatus) -> None:
        if what == "skip":
            console.print(f"[dim]skip {stage.name}: done ({status.detail})[/]", highlight=False)
        elif what == "start":
            console.print(f"[bold]>> {stage.name}[/] ({status.detail})", highlight=False)
        else:
            eval_progress.close()

    try:
        result = run_study(
            study,
            out,
            until=until,
            on_stage=on_stage,
            on_train_event=renderer,
            on_eval=eval_progress,
        )
    except NonFiniteLossError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        renderer.close()
        eval_progress.close()
    if result.report is not None:
        print_table9(console, result.report.table)
        print_pairs(console, result.report.pairs)
        print_checks(console, result.report.checks)
    ran = ", ".join(result.ran) or "nothing (every stage was done)"
    console.print(f"ran: {ran}", highlight=False)
    if report_file(out, "md").is_file():
        console.print(f"report: {report_file(out)}, {report_file(out, 'md')}", highlight=False)
