"""The study's stages as SLURM jobs through submitit (``robustlr run --executor slurm``): one
job per stage, each submitted when the stages it depends on have finished (the study process
stays up and schedules, as with local processes). ``cluster="local"`` runs the same jobs
with submitit's local executor (how the tests check this path without a cluster).

submitit is an optional dependency (``pip install robustlr[slurm]``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustlr.study.recipe import Recipe
from robustlr.study.stages import Stage, StudyError
from robustlr.study.worker import run_stage_job

log = logging.getLogger(__name__)

SUBMITIT_DIR = "submitit"  # DIR/submitit/: the jobs' pickles and logs


@dataclass(frozen=True)
class SlurmOptions:
    """Per-job resources: partition (None: the cluster's default), time limit in minutes,
    GPUs per job, CPUs (= torch threads) per job."""

    partition: str | None = None
    time_min: int = 240
    gpus_per_job: int = 0
    cpus_per_job: int = 1


@dataclass
class _Job:
    stage: Stage
    job: Any


class SubmititExecutor:
    """Each stage one submitit job of :func:`robustlr.study.worker.run_stage_job`."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path,
        options: SlurmOptions,
        *,
        slots: int = 64,
        cluster: str | None = "slurm",
    ) -> None:
        try:
            import submitit
        except ImportError:
            raise StudyError(
                "--executor slurm needs submitit: pip install 'robustlr[slurm]'"
            ) from None
        self.recipe, self.out_dir, self.options, self.slots = recipe, out_dir, options, slots
        folder = out_dir / SUBMITIT_DIR / "%j"
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params: dict[str, Any] = {
            "timeout_min": options.time_min,
            "gpus_per_node": options.gpus_per_job,
            "cpus_per_task": options.cpus_per_job,
            "nodes": 1,
            "tasks_per_node": 1,
        }
        if options.partition is not None:
            params["slurm_partition"] = options.partition
        self.executor.update_parameters(**params)

    def submit(self, stage: Stage) -> _Job:
        self.executor.update_parameters(name=f"robustlr {stage.name}")
        job = self.executor.submit(
            run_stage_job,
            str(self.recipe.path.resolve()),
            list(self.recipe.overrides),
            str(self.out_dir.resolve()),
            stage.name,
            self.options.cpus_per_job,
        )
        log.info("%s: submitted as job %s", stage.name, job.job_id)
        return _Job(stage, job)

    def poll(self, handle: _Job) -> str | None:
        if not handle.job.done():
            return None
        exception = handle.job.exception()
        if exception is None:
            return ""
        lines = [line for line in str(exception).splitlines() if line.strip()]
        return f"{lines[-1] if lines else type(exception).__name__} (job {handle.job.job_id})"

    def cancel(self, handle: _Job) -> None:
        handle.job.cancel(check=False)
