"""Run a study: the pending stages of a recipe, in order, in this process.

Training goes through the engine (a stage killed mid-way resumes from its checkpoint), each
eval stage writes ``eval.partial.csv`` and renames it to ``eval.csv`` when every attack is done
(so a killed eval leaves no rows behind that a re-run could duplicate), and the report stage
builds Table 9 from exactly the study's eval.csv files.

Under ``torchrun`` every process runs the training stages together; only rank 0 evaluates and
reports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from robustlr.attacks.spec import AttackSpec
from robustlr.device import resolve_device
from robustlr.eval.session import evaluate_checkpoint, open_checkpoint
from robustlr.runs import CHECKPOINT, EVAL_CSV, OUTCOMES
from robustlr.study.recipe import Recipe
from robustlr.study.stages import (
    DONE,
    EVAL_KEY,
    PARTIAL_CSV,
    PENDING,
    REPORT_MARKER,
    TRAIN_KEY,
    TRAIN_KINDS,
    Stage,
    StageStatus,
    check_study_folder,
    claim_study_folder,
    eval_checkpoint,
    eval_csvs,
    eval_key,
    eval_settings,
    inputs_digest,
    plan_stages,
    refuse_conflicts,
    report_key,
    resolve_stage,
    stage_status,
    stage_train_config,
    train_key,
    train_settings,
    write_json,
)
from robustlr.train import EventSink, TrainResult, resume_config
from robustlr.train import train as train_engine

if TYPE_CHECKING:
    from robustlr.report.pipeline import Report

log = logging.getLogger(__name__)

StageSink = Callable[[Stage, str, StageStatus], None]  # (stage, "start"|"skip"|"done", status)
EvalProgress = Callable[[Stage, AttackSpec, int, int], None]  # (stage, spec, done, total)


@dataclass
class StudyResult:
    """Each stage with the status it had before the study ran, and the report if made now."""

    out_dir: Path
    statuses: list[tuple[Stage, StageStatus]]
    ran: list[str]
    report: Report | None = None


def default_out_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def study_status(recipe: Recipe, out_dir: Path) -> list[tuple[Stage, StageStatus]]:
    """Every stage with its status; a stage after a pending stage it depends on is pending.
    :class:`StudyError` when the folder is another recipe's."""
    check_study_folder(recipe, out_dir)
    out: list[tuple[Stage, StageStatus]] = []
    untrained: set[Path] = set()  # run directories whose training is pending
    for stage in (resolve_stage(s, out_dir) for s in plan_stages(recipe)):
        status = stage_status(stage, recipe, out_dir)
        if stage.kind == "eval" and stage.run_dir in untrained and status.done:
            status = StageStatus(PENDING, "after its training")
        if stage.kind == "report" and status.done and any(not s.done for _, s in out):
            status = StageStatus(PENDING, "after the pending stages")
        if stage.kind in TRAIN_KINDS and not status.done and stage.run_dir:
            untrained.add(stage.run_dir)
        out.append((stage, status))
    return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_study(
    recipe: Recipe,
    out_dir: Path,
    *,
    until: str | None = None,
    on_stage: StageSink | None = None,
    on_train_event: EventSink | None = None,
    on_eval: EvalProgress | None = None,
) -> StudyResult:
    """Run every pending stage (up to and including the stage named ``until``)."""
    names = [s.name for s in plan_stages(recipe)]
    if until is not None and until not in names:
        raise ValueError(f"no stage {until!r}; stages: {', '.join(names)}")
    statuses = study_status(recipe, out_dir)
    refuse_conflicts(statuses, out_dir)
    claim_study_folder(recipe, out_dir)
    result = StudyResult(out_dir, statuses, [])
    for stage, _ in statuses:
        status = stage_status(stage, recipe, out_dir)  # earlier stages may have changed it
        if status.done:
            if on_stage:
                on_stage(stage, "skip", status)
        elif stage.kind in TRAIN_KINDS or _rank() == 0:
            if on_stage:
                on_stage(stage, "start", status)
            report = run_stage(stage, recipe, out_dir, on_train_event, on_eval)
            result.ran.append(stage.name)
            result.report = report or result.report
            if on_stage:
                on_stage(stage, "done", StageStatus(DONE))
        if stage.name == until:
            break
    return result


def run_stage(
    stage: Stage,
    recipe: Recipe,
    out_dir: Path,
    on_train_event: EventSink | None = None,
    on_eval: EvalProgress | None = None,
) -> Report | None:
    """Run one stage (whatever its status); the report stage returns what it built."""
    if stage.kind in TRAIN_KINDS:
        train_stage(stage, recipe, on_train_event)
        return None
    if stage.kind == "eval":
        eval_stage(stage, recipe, on_eval)
        return None
    return report_stage(recipe, out_dir)


def train_stage(stage: Stage, recipe: Recipe, on_event: EventSink | None = None) -> TrainResult:
    """Train one run; a run with a checkpoint continues from it (the engine's resume)."""
    assert stage.run_dir is not None
    config = stage_train_config(stage, recipe)
    if _rank() == 0:
        write_json(
            stage.run_dir / TRAIN_KEY,
            {"key": train_key(config), "settings": train_settings(config)},
        )
    resume = (stage.run_dir / CHECKPOINT).is_file()
    if resume:
        config = resume_config(stage.run_dir, config.to_dict(), mode=stage.mode)
    log.info("%s: %s into %s", stage.name, "resuming" if resume else "training", stage.run_dir)
    return train_engine(config, on_event=on_event, resume=resume)


def eval_stage(stage: Stage, recipe: Recipe, on_eval: EvalProgress | None = None) -> Path:
    """Attack the run's checkpoint with the recipe's suite; returns the complete eval.csv."""
    assert stage.run_dir is not None
    settings = recipe.eval
    device = resolve_device(settings.device)
    partial = stage.run_dir / PARTIAL_CSV
    (stage.run_dir / EVAL_KEY).unlink(missing_ok=True)  # eval.csv is not this key's until done
    partial.unlink(missing_ok=True)  # rows of an interrupted attempt
    target = open_checkpoint(eval_checkpoint(stage.run_dir, settings.checkpoint), device)
    images, labels, indices = target.load_images(settings.split, limit=settings.limit)
    total = len(labels)

    def on_batch(spec: AttackSpec, done: int) -> None:
        if on_eval:
            on_eval(stage, spec, done, total)

    evaluate_checkpoint(
        target,
        settings.attacks_for(stage.seed),
        images=images,
        labels=labels,
        indices=indices,
        split=settings.split,
        out_csv=partial,
        batch_size=settings.batch_size,
        device=device,
        examples_dir=stage.run_dir / OUTCOMES,
        on_batch=on_batch,
    )
    final = stage.run_dir / EVAL_CSV
    os.replace(partial, final)
    record = {"key": eval_key(stage, recipe), "settings": eval_settings(stage, recipe)}
    write_json(stage.run_dir / EVAL_KEY, record)
    return final


def report_stage(recipe: Recipe, out_dir: Path) -> Report:
    """Table 9, paired tests, sanity checks and plots from the study's eval.csv files (the
    same workflow as ``robustlr report``)."""
    # imported here: the report's scipy and matplotlib cost every training and eval stage
    # process about 2 s of CPU to import, and only this stage uses them
    from robustlr.report.files import PLOTS_DIR, report_file
    from robustlr.report.pipeline import make_report
    from robustlr.report.table9 import ReportSettings

    files = [p for p in eval_csvs(recipe, out_dir) if p.is_file()]
    options = recipe.report
    settings = ReportSettings(
        eps=options.eps, attack_steps=options.attack_steps, target_policy=options.target_policy
    )
    report = make_report(
        settings,
        report_file(out_dir),
        results=files,
        plots_dir=out_dir / PLOTS_DIR if options.plots else None,
        checkpoint_names=(CHECKPOINT,),
    )
    marker = {"recipe": recipe.name, "key": report_key(recipe), "inputs": inputs_digest(files)}
    write_json(out_dir / REPORT_MARKER, marker)
    return report
