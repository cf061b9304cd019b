"""RobustBench-style model-info JSON (``robustlr report --format robustbench``): one file per
model of Table 9 (each chosen run), with the RobustBench fields robustlr can fill honestly and,
under ``robustlr``, the intervals and threat keys behind them.

``autoattack_acc`` comes only from a standard ``autoattack`` row (fp32) at the report's eps and
norm; without one the field is absent (never filled from another attack). With it,
``clean_acc`` is the clean row on the same images (as RobustBench's two numbers are); without
it, Table 9's clean cell. ``additional_data``
is false for a robustlr-trained run (trained on the dataset's training split only) and absent
for an external model (unknown). The field list, in ``FIELDS``, is documented in
docs/external-models.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from robustlr.attacks.spec import format_eps
from robustlr.eval.runner import threat_key, threat_sha256
from robustlr.report.results import MTIME, ROW, RUN_KEY, eps_matches
from robustlr.report.table9 import MODES, Table9
from robustlr.runs import EXTERNAL_RECORD

log = logging.getLogger(__name__)

ROBUSTBENCH_FORMAT = "robustbench"  # the report format's name on the CLI
ROBUSTBENCH_DIR = "robustbench"  # the JSON files' directory, beside the report
AUTOATTACK = "autoattack"  # the standard ensemble; the only attack behind autoattack_acc
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench's names of the norms

# field -> (JSON type, required, meaning); RobustBench's model-info fields first, then ours
FIELDS: dict[str, tuple[str, bool, str]] = {
    "name": ("string", True, "the run's name"),
    "architecture": ("string", True, "the network (Table 9's row name)"),
    "dataset": ("string", True, "the dataset evaluated on"),
    "eps": ("string", True, "the report's eps, e.g. 16/255"),
    "clean_acc": ("string", True, "clean top-1 accuracy, %, two decimals"),
    "autoattack_acc": (
        "string",
        False,
        "standard AutoAttack accuracy at eps, %, two decimals (absent without that row)",
    ),
    "number_forward_passes": ("integer", True, "forward passes per prediction (1)"),
    "additional_data": (
        "boolean",
        False,
        "false for a robustlr-trained run; absent for an external model",
    ),
    "robustlr": ("object", True, "robustlr's evidence: see ROBUSTLR_FIELDS"),
}
ROBUSTLR_FIELDS: dict[str, tuple[str, bool, str]] = {
    "threat_model": ("string", True, "Linf or L2 (RobustBench's names)"),
    "norm": ("string", True, "linf or l2"),
    "eps_value": ("number", True, "eps as a number"),
    "split": ("string", True, "the split evaluated"),
    "train_mode": ("string", True, "regular or adversarial"),
    "external": ("boolean", True, "whether robustlr did not train the model"),
    "checkpoint_sha256": ("string", True, "the model's hash (external: its record's)"),
    "clean": ("object", True, "the clean row: see RESULT_FIELDS"),
    "autoattack": ("object", False, "the autoattack row: see RESULT_FIELDS"),
}
RESULT_FIELDS: dict[str, tuple[str, bool, str]] = {
    "accuracy": ("number", True, "top-1 accuracy, %"),
    "accuracy_low": ("number", True, "lower end of its 95% Wilson interval, %"),
    "accuracy_high": ("number", True, "upper end of its 95% Wilson interval, %"),
    "n": ("integer", True, "images evaluated"),
    "threat_key": ("object", True, "the row's threat key (images, model, attack settings)"),
    "threat_sha256": ("string", True, "SHA-256 of the threat key"),
}
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
}


def _result(row: pd.Series) -> dict[str, Any]:
    return {
        "accuracy": round(float(row["accuracy"]), 4),
        "accuracy_low": round(float(row["accuracy_low"]), 4),
        "accuracy_high": round(float(row["accuracy_high"]), 4),
        "n": int(row["n"]),
        "threat_key": threat_key(row),
        "threat_sha256": threat_sha256(row),
    }


def autoattack_row(rows: pd.DataFrame, eps: float, norm: str) -> pd.Series | None:
    """A run's standard AutoAttack row (fp32) at ``eps`` and ``norm`` on the most images (the
    lowest accuracy among them); None when there is none."""
    found = rows[
        (rows["attack"] == AUTOATTACK)
        & eps_matches(rows["eps"], eps)
        & (rows["norm"] == norm)
        & (rows["precision"] == "fp32")
    ]
    if found.empty:
        return None
    found = found[found["n"] == found["n"].max()]
    return found.sort_values(["accuracy", MTIME, ROW], ascending=[True, False, False]).iloc[0]


def clean_twin(rows: pd.DataFrame, row: pd.Series) -> pd.Series | None:
    """The newest fp32 clean row on the same images as ``row``; None when there is none."""
    found = rows[
        (rows["attack"] == "clean")
        & (rows["subset_sha256"] == row["subset_sha256"])
        & (rows["precision"] == "fp32")
    ]
    return None if found.empty else found.sort_values([MTIME, ROW]).iloc[-1]


def model_infos(table: Table9) -> list[dict[str, Any]]:
    """One model-info dict per chosen run of ``table`` that has a clean cell."""
    infos = []
    norm = table.settings.norm
    for (network, mode), run_key in sorted(table.runs.items()):
        clean = table.cells.get((network, f"{MODES[mode]}_clean"))
        if clean is None:
            log.warning("%s (%s): no clean row; no RobustBench JSON", network, mode)
            continue
        rows = table.results[table.results[RUN_KEY] == run_key]
        auto = autoattack_row(rows, table.eps, norm)
        twin = clean_twin(rows, auto) if auto is not None else None
        if auto is not None and twin is None:
            log.warning("%s: no clean row on the autoattack row's images", network)
            auto = None
        clean = twin if twin is not None else clean
        external = (Path(run_key) / EXTERNAL_RECORD).is_file()
        info: dict[str, Any] = {
            "name": str(clean["run"]),
            "architecture": network,
            "dataset": table.dataset,
            "eps": format_eps(table.eps),
            "clean_acc": f"{float(clean['accuracy']):.2f}",
            "number_forward_passes": 1,
        }
        ours: dict[str, Any] = {
            "threat_model": THREAT_MODELS[norm],
            "norm": norm,
            "eps_value": float(table.eps),
            "split": table.split,
            "train_mode": mode,
            "external": external,
            "checkpoint_sha256": str(clean["checkpoint_sha256"]),
            "clean": _result(clean),
        }
        if auto is not None:
            info["autoattack_acc"] = f"{float(auto['accuracy']):.2f}"
            ours["autoattack"] = _result(auto)
        if not external:
            info["additional_data"] = False
        info["robustlr"] = ours
        infos.append(info)
    return infos


def write_robustbench(table: Table9, directory: str | Path) -> list[Path]:
    """Write ``<directory>/<run>.json`` for every :func:`model_infos` entry; their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for info in model_infos(table):
        path = directory / f"{info['name']}.json"
        path.write_text(json.dumps(info, indent=2) + "\n")
        written.append(path)
    return written


def validate(info: dict[str, Any], fields: dict[str, tuple[str, bool, str]] = FIELDS) -> list[str]:
    """Problems of a model-info dict against a field list (unknown or missing fields, wrong
    JSON types; nested objects checked against their own lists); [] when it is valid."""
    nested = {"robustlr": ROBUSTLR_FIELDS, "clean": RESULT_FIELDS, "autoattack": RESULT_FIELDS}
    problems = [f"unknown field {k}" for k in info if k not in fields]
    for name, (kind, required, _) in fields.items():
        if name not in info:
            if required:
                problems.append(f"missing field {name}")
            continue
        value = info[name]
        wrong_bool = isinstance(value, bool) and kind != "boolean"
        if wrong_bool or not isinstance(value, JSON_TYPES[kind]):
            problems.append(f"{name} is {type(value).__name__}, not {kind}")
        elif kind == "object" and name in nested:
            problems += [f"{name}.{p}" for p in validate(value, nested[name])]
    return problems
