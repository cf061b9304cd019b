"""The stages of a study, what each one depends on, and how each one knows it is complete.

Layout of a study directory ``DIR``::

    DIR/study.json                       the recipe the folder belongs to
    DIR/<arch>-<mode>-s<seed>/           one run per (network, mode, training seed):
        config.json, metrics.csv, checkpoint.pt, best.pt    its train (or advtrain) stage
        train-key.json                   the train stage's key and the settings it hashes
        eval.csv, eval-key.json          its eval stage (eval.partial.csv until complete)
    DIR/table9.csv, table9.md, checks.csv, pairs.csv, plots/, report.json   the report stage

Every stage is keyed by a canonical hash of the resolved settings that decide its result
(:func:`train_key`, :func:`eval_key`). A training stage is done when its checkpoint.pt holds
the last epoch of a config with the stage's key; a checkpoint of other settings is a
``conflict`` (never reused, never overwritten: the study refuses and names the settings). An
eval stage is done when eval.csv holds one row per attack, all of the run's current
checkpoint, and eval-key.json holds the stage's key; the report when report.json records the
report's key and the current content of every eval.csv it was built from.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustlr.checkpoint import CheckpointError, read_checkpoint
from robustlr.errors import UserError
from robustlr.eval.session import file_sha256, with_clean
from robustlr.report.files import report_file
from robustlr.runs import BEST, CHECKPOINT, EVAL_CSV
from robustlr.study.recipe import Recipe
from robustlr.train.config import TrainConfig

PARTIAL_CSV = "eval.partial.csv"
REPORT_MARKER = "report.json"
STUDY_MARKER = "study.json"
TRAIN_KEY = "train-key.json"
EVAL_KEY = "eval-key.json"
REPORT_FILES = (report_file(".").name, report_file(".", "md").name)
DONE, PENDING, CONFLICT = "done", "pending", "conflict"
TRAIN_KINDS = ("train", "advtrain")
# TrainConfig fields that say where or how fast a run goes, not what it learns
NOT_RESULT = ("out", "runs_root", "data", "device", "num_workers", "checkpoint_every_steps")


class StudyError(UserError):
    """A study folder that cannot be used as asked (another recipe's, changed settings)."""


@dataclass(frozen=True)
class StageStatus:
    """``done`` or ``pending``, with what was found (e.g. ``resumes after epoch 2/6``)."""

    state: str
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.state == DONE

    @property
    def conflict(self) -> bool:
        return self.state == CONFLICT


@dataclass(frozen=True)
class Stage:
    """One step of the study: ``train``, ``advtrain``, ``eval`` or ``report``."""

    kind: str
    name: str  # e.g. "train resnet26-regular-s0", "eval resnet26-adversarial-s1", "report"
    arch: str = ""
    mode: str = ""
    run_dir: Path | None = None
    seed: int = 0


def run_name(arch: str, mode: str, seed: int) -> str:
    """A run's directory name in its study: ``<arch>-<mode>-s<seed>``."""
    return f"{arch}-{mode}-s{seed}"


def plan_stages(recipe: Recipe) -> list[Stage]:
    """Every training stage (seed, then network order, regular then adversarial), every eval
    in the same order, the report.

    Run directories are relative to the study directory (see :func:`resolve_stage`).
    """
    trains, evals = [], []
    seeds = sorted({s for n in recipe.networks for s in recipe.seeds_for(n)})
    for seed in seeds:
        for network in recipe.networks:
            if seed not in recipe.seeds_for(network):
                continue
            for mode in network.modes:
                kind = "train" if mode == "regular" else "advtrain"
                run = Path(run_name(network.arch, mode, seed))
                arch = network.arch
                trains.append(Stage(kind, f"{kind} {run}", arch, mode, run, seed))
                evals.append(Stage("eval", f"eval {run}", arch, mode, run, seed))
    return [*trains, *evals, Stage("report", "report")]


def dependencies(stage: Stage, stages: list[Stage]) -> list[Stage]:
    """The stages ``stage`` waits for: an eval its run's training, the report every eval."""
    if stage.kind == "eval":
        return [s for s in stages if s.kind in TRAIN_KINDS and s.run_dir == stage.run_dir]
    if stage.kind == "report":
        return [s for s in stages if s.kind == "eval"]
    return []


#: A stage's expected cost in regular trainings, from the digits study's stage-seconds
#: (docs/study.md): an adversarial training (PGD-3, mix 0.5) costs about 3.2 regular ones, an
#: eval about a quarter of one per attack it runs (4 attacks ~1, 17 with the sweeps ~4.6).
TRAINING_COST = {"train": 1.0, "advtrain": 3.2}
EVAL_COST_PER_ATTACK = 0.25
REPORT_COST = 0.25


def stage_cost(stage: Stage, recipe: Recipe) -> float:
    """The expected cost of ``stage`` (see :data:`TRAINING_COST`), for scheduling only."""
    if stage.kind == "eval":
        return EVAL_COST_PER_ATTACK * len(recipe.eval.attacks_for(stage.seed))
    return TRAINING_COST.get(stage.kind, REPORT_COST)


def critical_paths(stages: list[Stage], recipe: Recipe) -> dict[str, float]:
    """Per stage name: its cost plus the costliest chain of stages that wait on it. Starting
    the longest chains first keeps every core busy to the end (critical-path scheduling): a
    seed-0 training, whose eval carries the sweeps, goes before a cheaper one."""
    paths: dict[str, float] = {}
    for stage in reversed(stages):  # dependents come later in the plan
        waiting = [s for s in stages if stage in dependencies(s, stages)]
        paths[stage.name] = stage_cost(stage, recipe) + max(
            (paths[s.name] for s in waiting), default=0.0
        )
    return paths


def resolve_stage(stage: Stage, out_dir: Path) -> Stage:
    """The stage with its run directory inside ``out_dir``."""
    if stage.run_dir is None:
        return stage
    return Stage(
        stage.kind, stage.name, stage.arch, stage.mode, out_dir / stage.run_dir, stage.seed
    )


def canonical_hash(settings: Any) -> str:
    """sha256 of the settings as canonical JSON (sorted keys, no spaces, tuples as lists)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def train_settings(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """The fields of a resolved TrainConfig (or its saved dict) that decide the trained
    weights: all but where and how fast it runs (:data:`NOT_RESULT`). The seed is in."""
    data = config.to_dict() if isinstance(config, TrainConfig) else config
    fields = TrainConfig.__dataclass_fields__
    return json.loads(
        json.dumps({k: data.get(k) for k in fields if k not in NOT_RESULT}, default=str)
    )


def train_key(config: TrainConfig | dict[str, Any]) -> str:
    """The train stage's key: :func:`canonical_hash` of :func:`train_settings`."""
    return canonical_hash(train_settings(config))


def stage_train_config(stage: Stage, recipe: Recipe) -> TrainConfig:
    """The resolved TrainConfig of a (resolved) train, advtrain or eval stage's run."""
    assert stage.run_dir is not None
    return recipe.train_config(recipe.network(stage.arch), stage.mode, stage.run_dir, stage.seed)


def eval_settings(stage: Stage, recipe: Recipe) -> dict[str, Any]:
    """What decides an eval stage's rows: its run's train key, the attacks (clean first),
    the images (split, limit), the checkpoint chosen and the batch size."""
    ev = recipe.eval
    return {
        "train_key": train_key(stage_train_config(stage, recipe)),
        "attacks": [a.as_dict() for a in with_clean(ev.attacks_for(stage.seed))],
        "split": ev.split,
        "limit": ev.limit,
        "checkpoint": ev.checkpoint,
        "batch_size": ev.batch_size,
    }


def eval_key(stage: Stage, recipe: Recipe) -> str:
    return canonical_hash(eval_settings(stage, recipe))


def report_key(recipe: Recipe) -> str:
    """The report's key: its options and the recipe it belongs to."""
    r = recipe.report
    options = [recipe.name, r.eps, r.attack_steps, r.target_policy, r.plots]
    return canonical_hash(options)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON atomically (unique temp file in the folder, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"train.{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in changed)


def training_progress(run_dir: Path) -> tuple[int, int, dict[str, Any]] | None:
    """(epochs completed, step within the next epoch, its config) of a run's checkpoint.pt;
    None if there is none (or it is unreadable)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        saved = read_checkpoint(path, map_location=torch.device("cpu"))
    except CheckpointError:
        return None
    step = saved.training.step_in_epoch if saved.training else 0
    return saved.epoch, step, saved.config


def train_status(run_dir: Path, config: TrainConfig) -> StageStatus:
    """Done, pending (with where it resumes), or a conflict: checkpoint.pt is of other
    settings than ``config``'s (the detail names them)."""
    progress = training_progress(run_dir)
    if progress is None:
        return StageStatus(PENDING, "not started")
    epoch, step, saved_config = progress
    if train_key(saved_config) != train_key(config):
        changes = _describe_changes(train_settings(saved_config), train_settings(config))
        return StageStatus(CONFLICT, f"{run_dir.name} was trained with other settings: {changes}")
    assert config.epochs is not None
    if epoch >= config.epochs and step == 0:
        return StageStatus(DONE, f"{epoch} epochs")
    where = f"epoch {epoch}/{config.epochs}" + (f", step {step}" if step else "")
    return StageStatus(PENDING, f"resumes after {where}")


def eval_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint an eval stage attacks: ``final`` -> checkpoint.pt, ``best`` -> best.pt."""
    return run_dir / (BEST if which == "best" else CHECKPOINT)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def eval_status(run_dir: Path, expected_rows: int, checkpoint: Path, key: str) -> StageStatus:
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
    recorded = read_json(run_dir / EVAL_KEY) or {}
    if recorded.get("key") != key:
        return StageStatus(PENDING, f"{EVAL_CSV} is of other eval settings (redone)")
    return StageStatus(DONE, f"{expected_rows} attacks")


def inputs_digest(csv_files: list[Path]) -> dict[str, str]:
    """sha256 of each existing input file, keyed by its name relative to its study dir."""
    return {
        f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in csv_files
        if p.is_file()
    }


def report_status(out_dir: Path, csv_files: list[Path], key: str) -> StageStatus:
    marker = out_dir / REPORT_MARKER
    missing = [name for name in (REPORT_MARKER, *REPORT_FILES) if not (out_dir / name).is_file()]
    if missing:
        return StageStatus(PENDING, f"no {', '.join(missing)}")
    record = read_json(marker)
    if record is None:
        return StageStatus(PENDING, f"{REPORT_MARKER} is unreadable")
    recorded = record.get("inputs")
    if record.get("key") != key:
        return StageStatus(PENDING, "report settings changed since the report")
    if recorded != inputs_digest(csv_files):
        return StageStatus(PENDING, "evaluation results changed since the report")
    return StageStatus(DONE, f"{len(recorded)} results files")


def stage_status(stage: Stage, recipe: Recipe, out_dir: Path) -> StageStatus:
    """Whether ``stage`` (resolved, see :func:`resolve_stage`) is complete in ``out_dir``."""
    if stage.kind in TRAIN_KINDS:
        assert stage.run_dir is not None
        return train_status(stage.run_dir, stage_train_config(stage, recipe))
    if stage.kind == "eval":
        assert stage.run_dir is not None
        checkpoint = eval_checkpoint(stage.run_dir, recipe.eval.checkpoint)
        expected = len(with_clean(recipe.eval.attacks_for(stage.seed)))
        key = eval_key(stage, recipe)
        return eval_status(stage.run_dir, expected, checkpoint, key)
    return report_status(out_dir, eval_csvs(recipe, out_dir), report_key(recipe))


def check_study_folder(recipe: Recipe, out_dir: Path) -> None:
    """Refuse (:class:`StudyError`) a study folder that belongs to another recipe."""
    for marker in (out_dir / STUDY_MARKER, out_dir / REPORT_MARKER):
        owner = (read_json(marker) or {}).get("recipe")
        if owner is not None and owner != recipe.name:
            raise StudyError(
                f"{out_dir} is the study folder of recipe {owner!r}, not {recipe.name!r}: "
                f"give another --out"
            )


def claim_study_folder(recipe: Recipe, out_dir: Path) -> None:
    """Check the folder (:func:`check_study_folder`) and record the recipe in it."""
    check_study_folder(recipe, out_dir)
    if not (out_dir / STUDY_MARKER).is_file():
        write_json(out_dir / STUDY_MARKER, {"recipe": recipe.name})


def refuse_conflicts(statuses: list[tuple[Stage, StageStatus]], out_dir: Path) -> None:
    """:class:`StudyError` naming the first stage whose run holds other settings' checkpoint."""
    for stage, status in statuses:
        if status.conflict:
            assert stage.run_dir is not None
            raise StudyError(
                f"{status.detail}; give another --out, or delete {stage.run_dir} to train it again"
            )


def eval_csvs(recipe: Recipe, out_dir: Path) -> list[Path]:
    """The eval.csv of every run of the study (existing or not), in stage order."""
    return [
        out_dir / s.run_dir / EVAL_CSV
        for s in plan_stages(recipe)
        if s.kind == "eval" and s.run_dir is not None
    ]
