"""The study scheduler: stages side by side, each once its dependencies are done; and (slow)
real studies run with 1 and 2 jobs, killed and restarted, and through submitit's local
executor, all giving the same table9.csv."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import cli_command, cli_env, run_cli

from robustlr.study import load_recipe, plan_stages
from robustlr.study.scheduler import jobs_and_threads, run_scheduled
from robustlr.study.stages import StudyError, critical_paths

TINY = """
name = "tiny-seeds"
seeds = [0, 1]
[data]
dataset = "digits"
image_size = 16
[train]
epochs = 2
max_steps_per_epoch = 3
batch_size = 32
width = 0.25
small_input = true
[adversarial]
steps = 2
step_size = "8/255"
[[network]]
arch = "resnet26"
[eval]
limit = 32
batch_size = 16
[[eval.attack]]
name = "clean"
[[eval.attack]]
name = "pgd-targeted"
eps = "16/255"
step_size = "8/255"
steps = 2
[[eval.attack]]
name = "pgd-untargeted"
eps = "16/255"
step_size = "8/255"
steps = 2
"""


class Handle:
    def __init__(self, stage) -> None:  # type: ignore[no-untyped-def]
        self.stage = stage


class FakeExecutor:
    """Runs nothing: a stage 'finishes' the second time it is polled; records the order."""

    def __init__(self, slots: int, fail: str = "") -> None:
        self.slots, self.fail = slots, fail
        self.log: list[tuple[str, str]] = []
        self.polls: dict[str, int] = {}
        self.running = 0
        self.most = 0

    def submit(self, stage):  # type: ignore[no-untyped-def]
        self.log.append(("start", stage.name))
        self.running += 1
        self.most = max(self.most, self.running)
        return Handle(stage)

    def poll(self, handle):  # type: ignore[no-untyped-def]
        stage = handle.stage
        self.polls[stage.name] = self.polls.get(stage.name, 0) + 1
        if self.polls[stage.name] < 2:
            return None
        self.running -= 1
        self.log.append(("end", stage.name))
        return "boom" if stage.name == self.fail else ""

    def cancel(self, handle) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("cancel", handle.stage.name))


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_stages_start_once_their_dependencies_are_done(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path))
    fake = FakeExecutor(slots=3)
    result = run_scheduled(recipe, tmp_path / "study", fake, poll_s=0)
    names = [s.name for s in plan_stages(recipe)]
    assert sorted(result.ran) == sorted(names) and fake.most == 3
    position = {entry: i for i, entry in enumerate(fake.log)}
    for name in names:
        if name.startswith("eval "):
            run = name.removeprefix("eval ")
            train = ("advtrain " if "adversarial" in run else "train ") + run
            assert position[("end", train)] < position[("start", name)], name
    last_eval_end = max(position[("end", n)] for n in names if n.startswith("eval "))
    assert position[("start", "report")] > last_eval_end
    with (tmp_path / "study" / "logs" / "stages.csv").open(newline="") as fh:
        assert sorted(r["stage"] for r in csv.DictReader(fh)) == sorted(names)
    # trains run side by side, the longest chains first: both adversarial trainings (3.2 regular
    # trainings each, plus their evals), then a regular one
    assert [name for _, name in fake.log[:3]] == [
        "advtrain resnet26-adversarial-s0",
        "advtrain resnet26-adversarial-s1",
        "train resnet26-regular-s0",
    ]


def test_critical_paths_start_the_longest_chains_first() -> None:
    """In the digits study, a seed-0 training (whose eval carries the sweeps) outranks a seed-1
    training of the same kind, an adversarial training a regular one of the same seed, and an
    eval with the sweeps one without; the report comes last."""
    recipe = load_recipe("table9-digits")
    plan = plan_stages(recipe)
    paths = critical_paths(plan, recipe)
    assert paths["train lrnet26-regular-s0"] > paths["train lrnet26-regular-s1"]
    assert paths["advtrain lrnet26-adversarial-s0"] > paths["advtrain lrnet26-adversarial-s1"]
    assert paths["advtrain lrnet26-adversarial-s1"] > paths["train lrnet26-regular-s1"]
    assert paths["eval lrnet26-regular-s0"] > 3 * paths["eval lrnet26-regular-s1"] / 2
    # a training's chain is its cost plus its eval's chain
    train, evaluation = "train resnet26-regular-s0", "eval resnet26-regular-s0"
    assert paths[train] == pytest.approx(1.0 + paths[evaluation])
    assert min(paths, key=paths.__getitem__) == "report"


def test_a_failed_stage_stops_its_dependents_and_is_named(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path))
    fake = FakeExecutor(slots=2, fail="train resnet26-regular-s0")
    with pytest.raises(StudyError, match="stage 'train resnet26-regular-s0' failed: boom"):
        run_scheduled(recipe, tmp_path / "study", fake, poll_s=0)
    started = [name for what, name in fake.log if what == "start"]
    assert "eval resnet26-regular-s0" not in started and "report" not in started


def test_jobs_times_threads_fit_the_cores() -> None:
    assert jobs_and_threads(None, None, cores=2) == (2, 1)
    assert jobs_and_threads(1, None, cores=2) == (1, 1)  # --jobs never changes the threads
    assert jobs_and_threads(None, 4, cores=16) == (4, 4)
    assert jobs_and_threads(3, 2, cores=16) == (3, 2)
    with pytest.raises(StudyError, match="--jobs"):
        jobs_and_threads(0, None, cores=2)


# ---- slow: real studies ------------------------------------------------------------------------


def _table(study: Path) -> str:
    return (study / "table9.csv").read_text()


def _eval_rows(study: Path) -> dict[str, list[str]]:
    rows = {}
    for path in sorted(study.glob("*/eval.csv")):
        with path.open(newline="") as fh:
            rows[path.parent.name] = [r["attack"] for r in csv.DictReader(fh)]
    return rows


def _run(tmp_path: Path, out: str, *args: str) -> str:
    proc = run_cli("run", "tiny.toml", "--out", out, *args, cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted study with one job (the table the others must reproduce)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    _recipe(tmp_path)
    out = _run(tmp_path, "study", "--jobs", "1")
    assert "1 job(s) x 1 thread(s)" in out
    return tmp_path / "study"


@pytest.mark.slow
def test_jobs_1_and_2_give_the_same_table(tmp_path: Path, reference: Path) -> None:
    _recipe(tmp_path)
    out = _run(tmp_path, "study", "--jobs", "2")
    assert "2 job(s) x 1 thread(s)" in out
    assert _table(tmp_path / "study") == _table(reference)
    assert _eval_rows(tmp_path / "study") == _eval_rows(reference)
    assert "ran: nothing" in _run(tmp_path, "study", "--jobs", "2")


def _kill_when(tmp_path: Path, ready) -> None:  # type: ignore[no-untyped-def]
    """Start the study, SIGKILL it and its stage processes once ``ready(study)`` holds."""
    proc = subprocess.Popen(
        cli_command("run", "tiny.toml", "--out", "study", "--jobs", "2"),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 900
    try:
        while not ready(tmp_path / "study"):
            assert proc.poll() is None, "the study ended before the moment to kill it"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (the study ended: the failure says so)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _training_started(study: Path) -> bool:
    return any((study / "logs").glob("train-*.log")) and any(study.glob("*/metrics.csv"))


def _eval_running(study: Path) -> bool:
    """An eval stage has drawn its targets (mid-attack) and has not written eval.csv yet (its
    rows are written together at the end)."""
    return any(
        (study / log.stem.removeprefix("eval-") / "targets").is_dir()
        and not (study / log.stem.removeprefix("eval-") / "eval.csv").exists()
        for log in (study / "logs").glob("eval-*.log")
    )


def _report_running(study: Path) -> bool:
    return (study / "logs" / "report.log").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("moment", [_training_started, _eval_running, _report_running])
def test_killed_study_continues_to_the_same_table(tmp_path: Path, reference: Path, moment) -> None:  # type: ignore[no-untyped-def]
    _recipe(tmp_path)
    _kill_when(tmp_path, moment)
    _run(tmp_path, "study")
    assert _table(tmp_path / "study") == _table(reference)
    assert _eval_rows(tmp_path / "study") == _eval_rows(reference)  # none lost or duplicated


@pytest.mark.slow
def test_submitit_local_executor_gives_the_same_table(tmp_path: Path, reference: Path) -> None:
    pytest.importorskip("submitit")
    from robustlr.study.slurm import SlurmOptions, SubmititExecutor

    recipe = load_recipe(_recipe(tmp_path))
    out = tmp_path / "study"
    executor = SubmititExecutor(recipe, out, SlurmOptions(time_min=30), slots=2, cluster="local")
    cwd = Path.cwd()
    os.chdir(tmp_path)  # the stages resolve the recipe and the study folder as given
    try:
        result = run_scheduled(recipe, out, executor, poll_s=0.5)
    finally:
        os.chdir(cwd)
    assert "report" in result.ran and list((out / "submitit").iterdir())
    assert _table(out) == _table(reference)
    assert _eval_rows(out) == _eval_rows(reference)
