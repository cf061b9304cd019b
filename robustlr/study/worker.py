"""One stage of a study in its own process: ``python -m robustlr.study.worker ...`` (the local
executor) or :func:`run_stage_job` (a submitit job). A stage is deterministic whatever runs
beside it: it reloads the recipe, sets its own torch thread count, and writes only its files.

Progress goes to stdout as JSON lines ``{"fraction": 0.42, "detail": "epoch 3/8"}`` (the
local executor reads them); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from robustlr.attacks.spec import AttackSpec
from robustlr.eval.session import with_clean
from robustlr.study.recipe import load_recipe
from robustlr.study.runner import run_stage
from robustlr.study.stages import Stage, plan_stages, resolve_stage
from robustlr.train.events import EpochStarted, StepEnded, TrainEvent

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], detail)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_threads(threads: int) -> None:
    """This process's torch intra-op threads (and the OpenMP/MKL variables its children see)."""
    import torch

    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


def attack_weight(spec: AttackSpec) -> int:
    """A stage's progress counts an attack as its forward-backward passes plus one."""
    return max(1, spec.steps) * max(1, spec.restarts) + 1 if spec.name != "clean" else 1


def find_stage(recipe_stages: list[Stage], name: str) -> Stage:
    for stage in recipe_stages:
        if stage.name == name:
            return stage
    raise ValueError(f"no stage {name!r}; stages: {', '.join(s.name for s in recipe_stages)}")


def run_stage_job(
    recipe_path: str,
    overrides: list[str],
    out_dir: str,
    stage_name: str,
    threads: int,
    progress: Progress | None = None,
) -> str:
    """Run the stage named ``stage_name`` of the recipe (loaded with ``overrides``) in
    ``out_dir`` with ``threads`` torch threads; returns the stage's name."""
    set_threads(threads)
    recipe = load_recipe(recipe_path, overrides)
    out = Path(out_dir)
    stage = resolve_stage(find_stage(plan_stages(recipe), stage_name), out)
    on_train = on_eval = None
    if progress is not None:
        on_train, on_eval = _train_progress(progress), _eval_progress(progress, recipe, stage)
    log.info("stage %s with %d thread(s)", stage.name, threads)
    run_stage(stage, recipe, out, on_train, on_eval)
    if progress is not None:
        progress(1.0, "done")
    return stage.name


def _train_progress(progress: Progress) -> Callable[[TrainEvent], None]:
    epochs = [1]

    def on_event(event: TrainEvent) -> None:
        if isinstance(event, EpochStarted):
            epochs[0] = event.epochs
        elif isinstance(event, StepEnded):
            done = (event.epoch - 1) * event.steps + event.step
            fraction = done / max(event.steps * epochs[0], 1)
            progress(min(1.0, fraction), f"epoch {event.epoch}/{epochs[0]}")

    return on_event


def _eval_progress(progress: Progress, recipe, stage: Stage):  # type: ignore[no-untyped-def]
    attacks = with_clean(recipe.eval.attacks_for(stage.seed))
    weights = [attack_weight(a) for a in attacks]
    total = sum(weights)

    def on_eval(_stage: Stage, spec: AttackSpec, done: int, images: int) -> None:
        i = attacks.index(spec) if spec in attacks else 0
        fraction = (sum(weights[:i]) + weights[i] * done / max(images, 1)) / total
        progress(min(1.0, fraction), spec.describe())

    return on_eval


class _JsonProgress:
    """Progress as JSON lines on stdout, at most a few per second."""

    def __init__(self, every_s: float = 0.3) -> None:
        self.every_s, self.last = every_s, 0.0

    def __call__(self, fraction: float, detail: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self.last < self.every_s:
            return
        self.last = now
        sys.stdout.write(json.dumps({"fraction": round(fraction, 4), "detail": detail}) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustlr.study.worker")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from robustlr.errors import UserError

    try:
        run_stage_job(
            args.recipe, args.overrides, args.out, args.stage, args.threads, _JsonProgress()
        )
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
