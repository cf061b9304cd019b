"""Run a study's pending stages side by side: every training at once (up to ``jobs``), each
eval as soon as its training is done, the report last; of the stages ready, the one heading the
longest chain of remaining work first (``critical_paths``). Each stage runs in its own process
(:mod:`robustlr.study.worker`) with a fixed thread count, so its result does not depend on
what runs beside it or in which order; the stages' own completeness checks
(:mod:`robustlr.study.stages`) make a killed study continue where it stopped.

Executors: :class:`LocalExecutor` (subprocesses on this machine) and
:class:`robustlr.study.slurm.SubmititExecutor` (one submitit job per stage). The scheduler
reports :class:`StageEvent` objects; only the CLI prints.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from robustlr.study.recipe import Recipe
from robustlr.study.stages import (
    DONE,
    Stage,
    StageStatus,
    StudyError,
    claim_study_folder,
    critical_paths,
    dependencies,
    plan_stages,
    refuse_conflicts,
    resolve_stage,
    stage_status,
)

log = logging.getLogger(__name__)

LOGS_DIR = "logs"  # DIR/logs/<stage>.log: each stage process's stderr
TIMES_CSV = "stages.csv"  # DIR/logs/stages.csv: one row per stage run (wall seconds)
TIMES_COLUMNS = ("stage", "kind", "seconds", "slots")
LOCK_FILE = ".study.lock"


@dataclass(frozen=True)
class StageEvent:
    """What happened to a stage: ``skip`` (done already), ``start``, ``progress``, ``done``
    or ``failed``; ``fraction`` in [0, 1] for progress, ``detail`` a short text."""

    stage: Stage
    what: str
    fraction: float | None = None
    detail: str = ""


StageEventSink = Callable[[StageEvent], None]


def core_count() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def jobs_and_threads(
    jobs: int | None, threads: int | None, cores: int | None = None
) -> tuple[int, int]:
    """``(jobs, threads per job)``: ``threads`` default 1 whatever ``jobs`` is, because a
    stage's weights depend on its thread count (docs/study.md), so ``--jobs`` must not change
    it; ``jobs`` default ``cores // threads`` (jobs x threads <= cores)."""
    cores = cores or core_count()
    if jobs is not None and jobs < 1:
        raise StudyError(f"--jobs must be at least 1, not {jobs}")
    if threads is not None and threads < 1:
        raise StudyError(f"--threads must be at least 1, not {threads}")
    threads = threads or 1
    return jobs or max(1, cores // threads), threads


class Handle(Protocol):
    """A submitted stage: polled until it has finished."""

    stage: Stage


class Executor(Protocol):
    """Where stages run: ``slots`` at a time."""

    slots: int

    def submit(self, stage: Stage) -> Any: ...

    def poll(self, handle: Any) -> str | None:
        """None while running; "" when it succeeded; an error line when it failed."""
        ...

    def cancel(self, handle: Any) -> None: ...


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL when the study process dies (even by SIGKILL)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stage_log(out_dir: Path, stage: Stage) -> Path:
    """``DIR/logs/<stage name, spaces as dashes>.log``."""
    return out_dir / LOGS_DIR / f"{stage.name.replace(' ', '-')}.log"


def last_error_line(log_file: Path) -> str:
    """The ``Error: ...`` line of a failed stage's log, else its last line."""
    try:
        lines = [line.strip() for line in log_file.read_text().splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("Error: ")]
    return (errors or lines or ["no output"])[-1].removeprefix("Error: ")


@dataclass
class _Process:
    stage: Stage
    proc: subprocess.Popen[str]
    log_file: Path
    reader: threading.Thread


@dataclass
class LocalExecutor:
    """Each stage a ``python -m robustlr.study.worker`` subprocess with ``threads`` threads;
    its progress lines become ``progress`` events on ``events``."""

    recipe: Recipe
    out_dir: Path
    slots: int = 1
    threads: int = 1
    events: queue.Queue[StageEvent] = field(default_factory=queue.Queue)

    def command(self, stage: Stage) -> list[str]:
        cmd = [sys.executable, "-m", "robustlr.study.worker", "--recipe", str(self.recipe.path)]
        for pair in self.recipe.overrides:
            cmd += ["--set", pair]
        return [
            *cmd,
            "--out",
            str(self.out_dir),
            "--stage",
            stage.name,
            "--threads",
            str(self.threads),
        ]

    def submit(self, stage: Stage) -> _Process:
        log_file = stage_log(self.out_dir, stage)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
        }
        with log_file.open("w") as err:
            proc = subprocess.Popen(
                self.command(stage),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        reader = threading.Thread(target=self._read, args=(stage, proc), daemon=True)
        reader.start()
        return _Process(stage, proc, log_file, reader)

    def _read(self, stage: Stage, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                data = json.loads(line)
                event = StageEvent(stage, "progress", float(data["fraction"]), str(data["detail"]))
            except (ValueError, KeyError, TypeError):
                continue  # not a progress line
            self.events.put(event)

    def poll(self, handle: _Process) -> str | None:
        rc = handle.proc.poll()
        if rc is None:
            return None
        handle.reader.join(timeout=5)
        if rc == 0:
            return ""
        return f"{last_error_line(handle.log_file)} (exit {rc}; log {handle.log_file})"

    def cancel(self, handle: _Process) -> None:
        if handle.proc.poll() is None:
            handle.proc.terminate()
            try:
                handle.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                handle.proc.kill()


@contextlib.contextmanager
def study_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``DIR/.study.lock`` (released by the OS however the process ends);
    :class:`StudyError` when another ``robustlr run`` holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / LOCK_FILE).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another robustlr run is working in {out_dir}") from None
        yield


def selected_stages(recipe: Recipe, until: str | None) -> list[Stage]:
    """The plan's stages up to and including ``until`` (all by default)."""
    stages = plan_stages(recipe)
    names = [s.name for s in stages]
    if until is None:
        return stages
    if until not in names:
        raise StudyError(f"no stage {until!r}; stages: {', '.join(names)}")
    return stages[: names.index(until) + 1]


@dataclass
class ScheduleResult:
    """Each selected stage with its status before the study ran, and the stages run now (in
    plan order)."""

    out_dir: Path
    statuses: list[tuple[Stage, StageStatus]]
    ran: list[str]


def run_scheduled(
    recipe: Recipe,
    out_dir: Path,
    executor: Executor,
    *,
    until: str | None = None,
    on_event: StageEventSink | None = None,
    events: queue.Queue[StageEvent] | None = None,
    poll_s: float = 0.2,
) -> ScheduleResult:
    """Run every pending stage (up to ``until``) on ``executor``, each once its dependencies
    are done; :class:`StudyError` naming the first failed stage (the others running finish)."""
    from robustlr.study.runner import study_status

    emit = on_event or (lambda event: None)
    with study_lock(out_dir):
        statuses = study_status(recipe, out_dir)
        refuse_conflicts(statuses, out_dir)
        claim_study_folder(recipe, out_dir)
        chosen = {s.name for s in selected_stages(recipe, until)}
        statuses = [(s, st) for s, st in statuses if s.name in chosen]
        plan = [s for s, _ in statuses]
        waiting: list[Stage] = []
        for stage, status in statuses:
            if status.done:
                emit(StageEvent(stage, "skip", detail=status.detail))
            else:
                waiting.append(stage)
        finished = {s.name for s, st in statuses if st.done}
        running: list[Any] = []
        ran: list[str] = []
        failure = ""
        started: dict[str, float] = {}

        paths = critical_paths(plan, recipe)

        def ready(stage: Stage) -> bool:
            return all(d.name in finished for d in dependencies(stage, plan))

        try:
            while waiting or running:
                if not failure:
                    # the longest chain of remaining work first (critical_paths)
                    for stage in sorted(
                        (s for s in waiting if ready(s)), key=lambda s: -paths[s.name]
                    ):
                        if len(running) >= executor.slots:
                            break
                        waiting.remove(stage)
                        emit(
                            StageEvent(stage, "start", 0.0, _pending_detail(stage, recipe, out_dir))
                        )
                        started[stage.name] = time.monotonic()
                        running.append(executor.submit(stage))
                elif not running:
                    break
                if events is not None:
                    _drain(events, emit, poll_s)
                else:
                    time.sleep(poll_s)
                for handle in list(running):
                    outcome = executor.poll(handle)
                    if outcome is None:
                        continue
                    running.remove(handle)
                    if outcome == "":
                        finished.add(handle.stage.name)
                        ran.append(handle.stage.name)
                        took = time.monotonic() - started[handle.stage.name]
                        record_time(out_dir, handle.stage, took, executor.slots)
                        emit(StageEvent(handle.stage, "done", 1.0))
                    else:
                        failure = failure or f"stage {handle.stage.name!r} failed: {outcome}"
                        emit(StageEvent(handle.stage, "failed", detail=outcome))
                if not running and waiting and not any(ready(s) for s in waiting):
                    break  # (after a failure) nothing more can start
        finally:
            for handle in running:
                executor.cancel(handle)
        if events is not None:
            _drain(events, emit, 0)
        if failure:
            raise StudyError(failure)
        order = {s.name: i for i, s in enumerate(plan)}
        return ScheduleResult(out_dir, statuses, sorted(ran, key=order.__getitem__))


def record_time(out_dir: Path, stage: Stage, seconds: float, slots: int) -> None:
    """Append the stage's wall time to ``DIR/logs/stages.csv`` (the study's time breakdown)."""
    path = out_dir / LOGS_DIR / TIMES_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(TIMES_COLUMNS)
        writer.writerow([stage.name, stage.kind, f"{seconds:.1f}", slots])


def _pending_detail(stage: Stage, recipe: Recipe, out_dir: Path) -> str:
    status = stage_status(resolve_stage(stage, out_dir), recipe, out_dir)
    return "" if status.state == DONE else status.detail


def _drain(events: queue.Queue[StageEvent], emit: StageEventSink, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        timeout = deadline - time.monotonic()
        try:
            event = events.get(timeout=timeout) if timeout > 0 else events.get_nowait()
        except queue.Empty:
            return
        emit(event)
