"""Evaluation results as one pandas DataFrame: every ``eval.csv`` under a runs directory, or
given CSV files, with the run's arch and training mode filled from its ``config.json``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustlr.attacks.registry import RENAMED
from robustlr.errors import UserError
from robustlr.eval.runner import RESULT_COLUMNS, load_outcomes, verify_outcomes
from robustlr.eval.session import file_sha256
from robustlr.runs import CHECKPOINT_PREFERENCE, EVAL_CSV, read_run_config

log = logging.getLogger(__name__)

NUMERIC_COLUMNS = (
    "n",
    "eps",
    "step_size",
    "steps",
    "restarts",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "target_success",
    "zero_grad_fraction",
    "seconds",
    "passes",
)
# columns added by ``read_results`` (not in eval.csv)
SOURCE = "source"  # the CSV file a row came from
RUN_KEY = "run_key"  # a run's identity: its directory (two runs may share a name)
MTIME = "mtime"  # the CSV file's modification time (newest run wins)
ROW = "row"  # position within its file (later rows were appended later)
OUTCOMES_PATH = "outcomes_path"  # absolute path of the outcomes file, "" when none
TRAIN_SEED = "train_seed"  # a replicate of (arch, train_mode); "" for runs without one
EPS_TOL = 1e-6

REGULAR_NAMES = {"regular", "standard", "natural", "normal", "clean", "std"}


class ResultsError(UserError):
    """No results, or a results file that cannot be read; the CLI shows it as one line."""


def normalise_mode(value: object) -> str:
    """``adv``, ``advtrain``, ``adversarial`` -> "adversarial"; ``regular``, ``standard`` ->
    "regular"; anything else is kept (lower case)."""
    text = str(value).strip().lower()
    if text.startswith("adv"):
        return "adversarial"
    if text in REGULAR_NAMES:
        return "regular"
    return text


def find_eval_csvs(runs_dir: str | Path) -> list[Path]:
    """Every ``eval.csv`` below ``runs_dir`` (sorted); ResultsError if the directory is absent."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ResultsError(f"runs directory {root} does not exist")
    return sorted(root.rglob(EVAL_CSV))


def read_result_csv(path: str | Path) -> pd.DataFrame:
    """One results CSV as a DataFrame with every ``RESULT_COLUMNS`` column (numbers parsed,
    text columns as strings, missing values as "" or NaN) plus the source columns."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ResultsError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResultsError(f"cannot read results file {path}: {first}") from None
    missing = [c for c in ("attack", "accuracy") if c not in frame.columns]
    if missing:
        raise ResultsError(f"{path} is not an eval.csv (missing column(s) {', '.join(missing)})")
    directory = path.parent.resolve()
    frame = drop_stale_rows(frame, directory, path)
    try:
        return normalise_results(
            frame,
            source=str(path),
            run_key=str(directory),
            mtime=path.stat().st_mtime,
            directory=directory,
            config=read_run_config(directory),
        )
    except ValueError as exc:
        raise ResultsError(f"{path}: {exc}") from None


def current_checkpoint_hashes(run_dir: Path) -> set[str]:
    """SHA-256 of each checkpoint a run directory holds now (best.pt, checkpoint.pt)."""
    hashes = set()
    for name in CHECKPOINT_PREFERENCE:
        file = run_dir / name
        if file.is_file():
            hashes.add(file_sha256(file))
    return hashes


def drop_stale_rows(frame: pd.DataFrame, run_dir: Path, source: Path) -> pd.DataFrame:
    """``frame`` without the rows whose checkpoint is no longer one of the run's (its
    checkpoint.pt / best.pt were replaced since, e.g. by ``train --resume``), with a warning
    naming how many were left out. A folder that holds no checkpoint is not checked."""
    if "checkpoint_sha256" not in frame.columns or not len(frame):
        return frame
    current = current_checkpoint_hashes(run_dir)
    if not current:
        return frame
    recorded = frame["checkpoint_sha256"].fillna("").astype(str).str.strip()
    stale = (recorded != "") & ~recorded.isin(current)
    if stale.any():
        log.warning(
            "%s: %d row(s) left out: they evaluated a checkpoint that is no longer the run's "
            "(%s replaced since); run robustlr eval again for current rows",
            source,
            int(stale.sum()),
            " / ".join(CHECKPOINT_PREFERENCE),
        )
    return frame[~stale].reset_index(drop=True)


def normalise_results(
    frame: pd.DataFrame,
    *,
    source: str,
    run_key: str,
    mtime: float = 0.0,
    directory: Path | None = None,
    config: dict[str, object] | None = None,
) -> pd.DataFrame:
    """Eval rows (strings or values, e.g. ``AttackResult.row`` dicts) in the report's form:
    every ``RESULT_COLUMNS`` column, numbers parsed, arch / train_mode / run filled from
    ``config`` (a run's config.json) and the directory name, plus the source columns.
    ValueError when a row has no numeric accuracy."""
    frame = frame.copy()
    config = config or {}
    for column in RESULT_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    for column in frame.columns:
        if column not in NUMERIC_COLUMNS:
            frame[column] = frame[column].map(lambda v: "" if v is None else str(v))
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if frame["accuracy"].isna().any():
        raise ValueError(f"{int(frame['accuracy'].isna().sum())} row(s) without a numeric accuracy")
    for column, keys in (("arch", ("arch",)), ("train_mode", ("train_mode", "mode"))):
        fallback = next((str(config[k]) for k in keys if config.get(k)), "")
        frame[column] = frame[column].where(frame[column] != "", fallback)
    if directory is not None:
        frame["run"] = frame["run"].where(frame["run"] != "", directory.name)
    frame["train_mode"] = frame["train_mode"].map(normalise_mode)
    frame["attack"] = frame["attack"].str.strip().str.lower()
    for old, new in RENAMED.items():
        legacy = (frame["attack"] == old) & (frame["attack_settings"] == "")
        if legacy.any():
            log.warning(
                "%s: %d %s row(s) without attack_settings ran what is now called %s",
                source,
                int(legacy.sum()),
                old,
                new,
            )
            frame.loc[legacy, "attack"] = new
    frame["target_policy"] = frame["target_policy"].replace("", "none")
    frame["precision"] = frame["precision"].replace("", "fp32")
    frame[SOURCE] = source
    frame[RUN_KEY] = run_key
    frame[MTIME] = mtime
    frame[ROW] = np.arange(len(frame))
    frame[OUTCOMES_PATH] = [
        str((directory / name).resolve()) if name and directory is not None else ""
        for name in frame["outcomes_file"]
    ]
    return frame


def read_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate result CSVs (see ``read_result_csv``); ResultsError when there are none."""
    frames = [read_result_csv(p) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        raise ResultsError("no evaluation results found (no rows in any eval.csv)")
    return pd.concat(frames, ignore_index=True)


def collect_results(
    csv_files: Iterable[str | Path] = (), runs_dir: str | Path | None = "runs"
) -> pd.DataFrame:
    """Results from the given CSV files, or else from every ``eval.csv`` under ``runs_dir``."""
    files = [Path(p) for p in csv_files]
    if not files:
        if runs_dir is None:
            raise ResultsError("give results CSV files or a runs directory")
        files = find_eval_csvs(runs_dir)
        if not files:
            raise ResultsError(
                f"no eval.csv found under {runs_dir} (run `robustlr eval` on a run first)"
            )
    log.info("reading %d results file(s)", len(files))
    return read_results(files)


def eps_matches(series: pd.Series, eps: float) -> pd.Series:
    """Rows whose eps equals ``eps`` (to 1e-6)."""
    return (series - eps).abs() < EPS_TOL


def row_outcomes(row: pd.Series) -> tuple[np.ndarray | None, str]:
    """The per-example ``correct`` array of a result row from its outcomes file, or (None, why
    not) when there is none or it belongs to another row (``verify_outcomes``)."""
    data, why = row_outcome_data(row)
    return (None, why) if data is None else (np.asarray(data["correct"], dtype=bool), "")


def row_outcome_data(row: pd.Series) -> tuple[dict[str, Any] | None, str]:
    """A result row's outcomes file as read by ``load_outcomes`` (``correct``, ``norms``...),
    or (None, why not) when there is none or it belongs to another row."""
    path = str(row.get(OUTCOMES_PATH, "") or "")
    if not path:
        return None, f"run {row['run']} saved no outcomes file for {row['attack']}"
    if not Path(path).is_file():
        return None, f"outcomes file {path} is missing"
    try:
        data = load_outcomes(path)
    except (OSError, ValueError, KeyError) as exc:
        return None, f"outcomes file {path} is unreadable ({exc})"
    why = verify_outcomes(data, row, path)
    if why:
        log.warning("%s", why)
        return None, why
    return data, ""
