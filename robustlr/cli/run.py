"""``robustlr run RECIPE``: a whole study (train, advtrain, eval, report) from one recipe file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from robustlr.attacks.spec import AttackSpec
from robustlr.cli.errors import UsageFailure, command
from robustlr.cli.report import print_checks, print_pairs, print_table9
from robustlr.cli.train import _Renderer
from robustlr.report.files import report_file
from robustlr.runs import check_output_path
from robustlr.study import (
    Stage,
    StageStatus,
    default_out_dir,
    load_recipe,
    run_study,
    study_status,
)
from robustlr.study.recipe import Recipe
from robustlr.study.scheduler import (
    LocalExecutor,
    StageEvent,
    jobs_and_threads,
    run_scheduled,
    selected_stages,
)
from robustlr.train import NonFiniteLossError

STATE_STYLE = {"done": "green", "pending": "yellow", "conflict": "red"}
EXECUTORS = ("local", "slurm")


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


class _StageView:
    """The running stages with progress and ETA (a live view on a terminal), else one line
    per stage start and end."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total, self.finished = console, total, 0
        self.tasks: dict[str, TaskID] = {}
        self.started: dict[str, float] = {}
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[detail]}"),
                console=console,
            )
            self.overall = self.progress.add_task("stages", total=total, detail="")
            self.progress.start()

    def __call__(self, event: StageEvent) -> None:
        name, c = event.stage.name, self.console
        if event.what == "skip":
            c.print(f"[dim]skip {name}: done ({event.detail})[/]", highlight=False)
            self._finish()
        elif event.what == "start":
            self.started[name] = time.monotonic()
            if self.progress is not None:
                self.tasks[name] = self.progress.add_task(name, total=1.0, detail=event.detail)
            else:
                c.print(f">> {name}" + (f" ({event.detail})" if event.detail else ""))
        elif event.what == "progress" and self.progress is not None and name in self.tasks:
            self.progress.update(self.tasks[name], completed=event.fraction, detail=event.detail)
        elif event.what in ("done", "failed"):
            took = time.monotonic() - self.started.get(name, time.monotonic())
            if self.progress is not None and name in self.tasks:
                self.progress.remove_task(self.tasks.pop(name))
            word = "done" if event.what == "done" else "[red]FAILED[/]"
            c.print(f"{word} {name} in {took:.0f} s {event.detail}".rstrip(), highlight=False)
            self._finish()

    def _finish(self) -> None:
        self.finished += 1
        if self.progress is not None:
            self.progress.update(self.overall, completed=self.finished)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _executor(
    executor: str,
    study: Recipe,
    out: Path,
    jobs: int | None,
    threads: int | None,
    slurm: dict[str, object],
):  # type: ignore[no-untyped-def]
    if executor == "local":
        if jobs is None and torch.cuda.is_available():
            jobs = 1  # the stages would share one GPU; --jobs N to run several anyway
        n, t = jobs_and_threads(jobs, threads)
        return LocalExecutor(study, out, n, t), f"{n} job(s) x {t} thread(s)"
    from robustlr.study.slurm import SlurmOptions, SubmititExecutor

    options = SlurmOptions(cpus_per_job=threads or 1, **slurm)  # type: ignore[arg-type]
    slots = jobs or 64
    where = f"SLURM jobs (partition {options.partition or 'default'}, {options.time_min} min"
    return SubmititExecutor(study, out, options, slots=slots), f"{where}, {slots} at a time)"


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
@click.option(
    "--until", default=None, help="Stop after this stage, e.g. 'train resnet26-regular-s0'."
)
@click.option(
    "--jobs",
    type=int,
    default=None,
    help="Stages run at once [default: cores / threads, or 1 with a GPU (local); 64 (slurm)].",
)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="Torch threads per stage [default: 1; a stage's weights depend on it, --jobs does not].",
)
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default="local",
    show_default=True,
    help="Where stages run: local processes, or one SLURM job per stage (submitit).",
)
@click.option("--partition", default=None, help="SLURM partition [default: the cluster's].")
@click.option(
    "--time", "time_min", type=int, default=240, show_default=True, help="SLURM minutes per job."
)
@click.option("--gpus-per-job", type=int, default=0, show_default=True, help="SLURM GPUs per job.")
def run(
    recipe: str,
    out_dir: Path | None,
    dry_run: bool,
    data: str | None,
    overrides: tuple[str, ...],
    until: str | None,
    jobs: int | None,
    threads: int | None,
    executor: str,
    partition: str | None,
    time_min: int,
    gpus_per_job: int,
) -> None:
    """Run a study from RECIPE (a .toml file or a shipped name such as table9-digits): train
    and adversarially train each network for each seed, evaluate every run, write
    DIR/table9.csv, .md and plots/. Independent stages run side by side (--jobs); completed
    stages are skipped, so a killed study continues where it stopped."""
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every process, in order
        _run_in_process(console, study, out, until)
        return
    slurm = {"partition": partition, "time_min": time_min, "gpus_per_job": gpus_per_job}
    runner, how = _executor(executor, study, out, jobs, threads, slurm)
    console.print(f"stages run as {how}", highlight=False)
    view = _StageView(console, len(selected_stages(study, until)))
    events = getattr(runner, "events", None)
    try:
        result = run_scheduled(study, out, runner, until=until, on_event=view, events=events)
    finally:
        view.close()
    if "report" in result.ran and report_file(out, "md").is_file():
        console.print(report_file(out, "md").read_text(), highlight=False, markup=False)
    ran = ", ".join(result.ran) or "nothing (every stage was done)"
    console.print(f"ran: {ran}", highlight=False)
    if report_file(out, "md").is_file():
        console.print(f"report: {report_file(out)}, {report_file(out, 'md')}", highlight=False)


def _run_in_process(console: Console, study: Recipe, out: Path, until: str | None) -> None:
    """The study's stages one after the other in this process (every torchrun process
    trains; rank 0 evaluates and reports)."""
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
