"""The stages of a study and how each one knows it is complete (from its files alone).

Layout of a study directory ``DIR``::

    DIR/<arch>-regular/       train stage: config.json, metrics.csv, checkpoint.pt, best.pt
    DIR/<arch>-adversarial/   advtrain stage
    DIR/<arch>-<mode>/eval.csv        eval stage (written as eval.partial.csv, then renamed)
    DIR/table9.csv, table9.md, checks.csv, pairs.csv, plots/, report.json   report stage

A training stage is done when its checkpoint.pt holds the last epoch; an eval stage when
eval.csv holds one row per attack, all of the checkpoint it evaluates now; the report when
report.json records the current content of every eval.csv it was built from.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from robustlr.checkpoint import CheckpointError, read_checkpoint
from robustlr.eval.session import file_sha256, with_clean
from robustlr.report.writers import report_file
from robustlr.runs import BEST, CHECKPOINT, EVAL_CSV
from robustlr.study.recipe import Recipe

PARTIAL_CSV = "eval.partial.csv"
REPORT_MARKER = "report.json"
REPORT_FILES = (report_file(".").name, report_file(".", "md").name)
DONE, PENDING = "done", "pending"


@dataclass(frozen=True)
class StageStatus:
    """``done`` or ``pending``, with what was found (e.g. ``resumes after epoch 2/6``)."""

    state: str
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.state == DONE


@dataclass(frozen=True)
class Stage:
    """One step of the study: ``train``, ``advtrain``, ``eval`` or ``report``."""

    kind: str
    name: str  # e.g. "train resnet26", "eval resnet26-adversarial", "report"
    arch: str = ""
    mode: str = ""
    run_dir: Path | None = None


def run_dir_for(out_dir: Path, arch: str, mode: str) -> Path:
    return out_dir / f"{arch}-{mode}"


def plan_stages(recipe: Recipe) -> list[Stage]:
    """Every training stage (network order, regular then adversarial), every eval, the report.

    Run directories are relative to the study directory (see :func:`resolve_stage`).
    """
    trains, evals = [], []
    for network in recipe.networks:
        for mode in network.modes:
            kind = "train" if mode == "regular" else "advtrain"
            run = Path(f"{network.arch}-{mode}")
            trains.append(Stage(kind, f"{kind} {network.arch}", network.arch, mode, run))
            evals.append(Stage("eval", f"eval {network.arch}-{mode}", network.arch, mode, run))
    return [*trains, *evals, Stage("report", "report")]


def resolve_stage(stage: Stage, out_dir: Path) -> Stage:
    """The stage with its run directory inside ``out_dir``."""
    if stage.run_dir is None:
        return stage
    return Stage(stage.kind, stage.name, stage.arch, stage.mode, out_dir / stage.run_dir)


def training_progress(run_dir: Path) -> tuple[int, int] | None:
    """(epochs completed, step within the next epoch) of a run's checkpoint.pt; None if none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        saved = read_checkpoint(path, map_location=torch.device("cpu"))
    except CheckpointError:
        return None
    return saved.epoch, saved.training.step_in_epoch if saved.training else 0


def train_status(run_dir: Path, epochs: int) -> StageStatus:
    progress = training_progress(run_dir)
    if progress is None:
        return StageStatus(PENDING, "not started")
    epoch, step = progress
    if epoch >= epochs and step == 0:
        return StageStatus(DONE, f"{epoch} epochs")
    where = f"epoch {epoch}/{epochs}" + (f", step {step}" if step else "")
    return StageStatus(PENDING, f"resumes after {where}")


def eval_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint an eval stage attacks: ``final`` -> checkpoint.pt, ``best`` -> best.pt."""
    return run_dir / (BEST if which == "best" else CHECKPOINT)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def eval_status(run_dir: Path, expected_rows: int, checkpoint: Path) -> StageStatus:
    results = run_dir / EVAL_CSV
    if not results.is_file():
        partial = (
            " (an interrupted attempt will be redone)" if (run_dir / PARTIAL_CSV).exists() else ""
        )
        return StageStatus(PENDING, f"no {EVAL_CSV}{partial}")
    rows = csv_rows(results)
    if len(rows) != expected_rows:
        return StageStatus(PENDING, f"{EVAL_CSV} has {len(rows)} rows, expected {expected_rows}")
    if not checkpoint.is_file():
        return StageStatus(PENDING, f"{checkpoint.name} is missing")
    digest = file_sha256(checkpoint)
    if any(r.get("checkpoint_sha256") != digest for r in rows):
        return StageStatus(PENDING, f"{EVAL_CSV} is of an older {checkpoint.name}")
    return StageStatus(DONE, f"{expected_rows} attacks")


def inputs_digest(csv_files: list[Path]) -> dict[str, str]:
    """sha256 of each existing input file, keyed by its name relative to its study dir."""
    return {
        f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in csv_files
        if p.is_file()
    }


def report_status(out_dir: Path, csv_files: list[Path]) -> StageStatus:
    marker = out_dir / REPORT_MARKER
    missing = [name for name in (REPORT_MARKER, *REPORT_FILES) if not (out_dir / name).is_file()]
    if missing:
        return StageStatus(PENDING, f"no {', '.join(missing)}")
    try:
        recorded = json.loads(marker.read_text()).get("inputs")
    except (OSError, json.JSONDecodeError, AttributeError):
        return StageStatus(PENDING, f"{REPORT_MARKER} is unreadable")
    if recorded != inputs_digest(csv_files):
        return StageStatus(PENDING, "evaluation results changed since the report")
    return StageStatus(DONE, f"{len(recorded)} results files")


def stage_status(stage: Stage, recipe: Recipe, out_dir: Path) -> StageStatus:
    """Whether ``stage`` (resolved, see :func:`resolve_stage`) is complete in ``out_dir``."""
    if stage.kind in ("train", "advtrain"):
        assert stage.run_dir is not None
        config = recipe.train_config(recipe.network(stage.arch), stage.mode, stage.run_dir)
        assert config.epochs is not None
        return train_status(stage.run_dir, config.epochs)
    if stage.kind == "eval":
        assert stage.run_dir is not None
        checkpoint = eval_checkpoint(stage.run_dir, recipe.eval.checkpoint)
        return eval_status(stage.run_dir, len(with_clean(recipe.eval.attacks)), checkpoint)
    return report_status(out_dir, eval_csvs(recipe, out_dir))


def eval_csvs(recipe: Recipe, out_dir: Path) -> list[Path]:
    """The eval.csv of every run of the study (existing or not), in stage order."""
    return [
        out_dir / s.run_dir / EVAL_CSV
        for s in plan_stages(recipe)
        if s.kind == "eval" and s.run_dir is not None
    ]
