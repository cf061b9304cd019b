"""The paper's Table 9 from evaluation results: per network, its adversarially trained run's
clean / targeted-PGD / untargeted-PGD accuracy and its regular-trained run's clean accuracy.

Choices (stated in the report's notes):

* dataset and split: the given ones; else the only dataset in the results (several: an error)
  and the "test" split if present, else "val", else the first.
* eps: the given one; else 16/255 (the paper's) if any PGD row has it; else the eps of most
  PGD rows (ties: the smaller).
* run per network and training mode: the newest, i.e. the one whose eval.csv was modified
  last (ties: the later run name); ``runs`` restricts the candidates to named runs.
* attack cells: PGD rows at the report's eps, norm and precision (fp32), targeted with target
  policy "random" (Kannan et al.) or untargeted; with ``attack_steps`` only rows with that
  many steps. Among them the rows on the most images (sweeps on subsets do not fill the table)
  and of those the strongest, i.e. the lowest accuracy (ties: more steps, then later row).
* clean cells: the clean row on the most images (ties: the later row).
* reference cells beside the table (not in the paper): per training mode, the strongest row of
  each reference attack (registry ``reference``: APGD-CE, standard AutoAttack) at the report's
  eps and norm on the most images. The paper's PGD cannot cross the eps ball in 20 x 1/255 or
  10 x 2/255 steps from a random start and so overstates robust accuracy; these columns show by
  how much (and the ``pgd_not_optimistic`` check warns when the gap is large).

A missing cell stays empty (NaN) and a note says why.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import pandas as pd

from robustlr.attacks.registry import ATTACKS, names_where
from robustlr.attacks.spec import format_eps
from robustlr.report.results import MTIME, ROW, RUN_KEY, ResultsError, eps_matches

log = logging.getLogger(__name__)

PAPER_EPS = 16 / 255
CELLS = ("adv_clean", "adv_targeted", "adv_untargeted", "regular_clean")
EXTRA_CELLS = ("regular_targeted", "regular_untargeted")
TABLE9_COLUMNS = ("network", *CELLS)
INTERVAL_COLUMNS = tuple(f"{c}_{end}" for c in CELLS for end in ("low", "high"))
# reference attack -> its registry names (e.g. "apgd_ce" -> ("apgd-ce",))
REFERENCES = {
    ref: names_where(reference=ref)
    for ref in dict.fromkeys(a.reference for a in ATTACKS.values() if a.reference)
}
REFERENCE_CELLS = tuple(f"{mode}_{ref}" for mode in ("adv", "regular") for ref in REFERENCES)
EXTRA_COLUMNS = tuple(
    name for c in (*EXTRA_CELLS, *REFERENCE_CELLS) for name in (c, f"{c}_low", f"{c}_high")
)
THREAT_COLUMNS = (
    "dataset",
    "split",
    "n",
    "norm",
    "eps",
    "steps",
    "step_size",
    "restarts",
    "target_policy",
    "targets_seed",
    "precision",
    "adv_run",
    "regular_run",
)
COLUMNS = (*TABLE9_COLUMNS, *INTERVAL_COLUMNS, *EXTRA_COLUMNS, *THREAT_COLUMNS)
MODES = {"adversarial": "adv", "regular": "regular"}
PGD = names_where(family="pgd")  # the attack cells' attacks (their target policy decides)


@dataclass(frozen=True)
class ReportSettings:
    """What the report compares: threat model and row-choice rules (None: chosen from data)."""

    eps: float | None = None
    dataset: str | None = None
    split: str | None = None
    norm: str = "linf"
    attack_steps: int | None = None
    target_policy: str = "random"
    precision: str = "fp32"
    runs: tuple[str, ...] = ()


@dataclass
class Table9:
    """The table (``frame``, one row per network, ``COLUMNS``), the result row behind every
    filled cell, the chosen run per (network, training mode), and the notes."""

    frame: pd.DataFrame
    cells: dict[tuple[str, str], pd.Series]
    runs: dict[tuple[str, str], str]
    notes: list[str]
    dataset: str
    split: str
    eps: float
    settings: ReportSettings
    results: pd.DataFrame = field(repr=False)
    references: dict[tuple[str, str], pd.Series] = field(default_factory=dict, repr=False)

    @property
    def networks(self) -> list[str]:
        return list(self.frame["network"])


def network_order(name: str) -> tuple[int, int, str]:
    """ResNets first, then LR-Nets, then others; by depth within a family."""
    match = re.match(r"([a-z_]+?)(\d+)", name)
    family, depth = (match.group(1), int(match.group(2))) if match else (name, 0)
    rank = {"resnet": 0, "lrnet": 1}.get(family, 2)
    return (rank, depth, name)


def _choose_dataset_split(results: pd.DataFrame, settings: ReportSettings) -> tuple[str, str]:
    datasets = sorted(set(results["dataset"]))
    if settings.dataset is not None:
        if settings.dataset not in datasets:
            raise ResultsError(
                f"no results for dataset {settings.dataset!r} (found: {', '.join(datasets)})"
            )
        dataset = settings.dataset
    elif len(datasets) == 1:
        dataset = datasets[0]
    else:
        raise ResultsError(
            f"results cover several datasets ({', '.join(map(repr, datasets))}); "
            "choose one with --dataset"
        )
    splits = sorted(set(results.loc[results["dataset"] == dataset, "split"]))
    if settings.split is not None:
        if settings.split not in splits:
            raise ResultsError(
                f"no {dataset!r} results on split {settings.split!r} (found: {', '.join(splits)})"
            )
        return dataset, settings.split
    for preferred in ("test", "val"):
        if preferred in splits:
            return dataset, preferred
    return dataset, splits[0]


def _pgd_rows(rows: pd.DataFrame, settings: ReportSettings) -> pd.DataFrame:
    pgd = rows["attack"].isin(PGD)
    return rows[pgd & (rows["precision"] == settings.precision) & (rows["norm"] == settings.norm)]


def choose_eps(rows: pd.DataFrame, settings: ReportSettings) -> float:
    """The report's eps (see the module docstring)."""
    if settings.eps is not None:
        return float(settings.eps)
    pgd = _pgd_rows(rows, settings)
    if pgd.empty:
        return PAPER_EPS
    if eps_matches(pgd["eps"], PAPER_EPS).any():
        return PAPER_EPS
    counts = pgd["eps"].round(9).value_counts()
    top = counts[counts == counts.max()].index
    return float(min(top))


def choose_runs(rows: pd.DataFrame) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The newest run per (arch, training mode) and notes on the choices made."""
    chosen: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    runs = rows.groupby([RUN_KEY], sort=False).agg(
        arch=("arch", "first"),
        mode=("train_mode", "first"),
        run=("run", "first"),
        mtime=(MTIME, "max"),
    )
    for (arch, mode), group in runs.groupby(["arch", "mode"], sort=True):
        if mode not in MODES:
            notes.append(
                f"{arch}: run(s) {', '.join(group['run'])} ignored: training mode {mode!r} is "
                "neither 'adversarial' nor 'regular'"
            )
            continue
        ordered = group.sort_values(["mtime", "run"])
        chosen[(arch, mode)] = str(ordered.index[-1])
        if len(ordered) > 1:
            notes.append(
                f"{arch} ({mode}): {len(ordered)} runs; using the newest, "
                f"{ordered['run'].iloc[-1]} (others: {', '.join(ordered['run'].iloc[:-1])})"
            )
    return chosen, notes


def pick_clean(rows: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """The clean row on the most images (ties: the later one), or (None, why not)."""
    clean = rows[rows["attack"] == "clean"]
    if clean.empty:
        return None, "no clean row"
    clean = clean[clean["n"] == clean["n"].max()]
    fp32 = clean[clean["precision"] == "fp32"]
    clean = fp32 if len(fp32) else clean
    return clean.sort_values([MTIME, ROW]).iloc[-1], ""


def pick_attack(
    rows: pd.DataFrame, kind: str, eps: float, settings: ReportSettings
) -> tuple[pd.Series | None, str]:
    """The strongest matching PGD row (``kind`` "targeted" or "untargeted"), or (None, why)."""
    if kind == "targeted":
        policies = (settings.target_policy,)
        what = f"targeted PGD (target policy {settings.target_policy})"
    else:
        policies = ("none",)
        what = "untargeted PGD"
    match = (
        rows["attack"].isin(PGD)
        & rows["target_policy"].isin(policies)
        & eps_matches(rows["eps"], eps)
        & (rows["norm"] == settings.norm)
        & (rows["precision"] == settings.precision)
    )
    where = f"{settings.norm} eps {format_eps(eps)}, {settings.precision}"
    if settings.attack_steps is not None:
        match &= rows["steps"] == settings.attack_steps
        where += f", {settings.attack_steps} steps"
    found = rows[match]
    if found.empty:
        return None, f"no {what} row at {where}"
    found = found[found["n"] == found["n"].max()]
    found = found.sort_values(
        ["accuracy", "steps", MTIME, ROW], ascending=[True, False, False, False]
    )
    return found.iloc[0], ""


def pick_reference(
    rows: pd.DataFrame, reference: str, eps: float, settings: ReportSettings
) -> pd.Series | None:
    """The strongest row of a reference attack (``REFERENCES``) at ``eps`` and the report's
    norm, on the most images; None when there is none."""
    found = rows[
        rows["attack"].isin(REFERENCES[reference])
        & eps_matches(rows["eps"], eps)
        & (rows["norm"] == settings.norm)
    ]
    if found.empty:
        return None
    found = found[found["n"] == found["n"].max()]
    return found.sort_values(["accuracy", MTIME, ROW], ascending=[True, False, False]).iloc[0]


def _fmt_values(values: list[object]) -> str:
    seen: list[str] = []
    for value in values:
        text = _text(value)
        if text not in seen:
            seen.append(text)
    return "/".join(seen)


def eps_text(value: object) -> str:
    """An eps or step size as ``k/255`` (or a decimal); "" when missing."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    return "" if pd.isna(number) else format_eps(number)


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build_table9(results: pd.DataFrame, settings: ReportSettings | None = None) -> Table9:
    """Table 9 from a results DataFrame (``robustlr.report.results.collect_results``)."""
    settings = settings or ReportSettings()
    if results.empty:
        raise ResultsError("no evaluation results to report")
    dataset, split = _choose_dataset_split(results, settings)
    rows = results[(results["dataset"] == dataset) & (results["split"] == split)]
    if settings.runs:
        wanted = set(settings.runs)
        unknown = wanted - set(rows["run"])
        if unknown:
            raise ResultsError(
                f"no {dataset}/{split} results for run(s) {', '.join(sorted(unknown))}"
            )
        rows = rows[rows["run"].isin(wanted)]
    eps = choose_eps(rows, settings)
    notes = [
        f"threat model: {dataset} {split}, {settings.norm} eps {format_eps(eps)}, "
        f"{settings.precision}; attack cells hold the strongest (lowest accuracy) matching PGD "
        "row on the most images"
        + (f" with {settings.attack_steps} steps" if settings.attack_steps else "")
    ]
    chosen, run_notes = choose_runs(rows)
    notes += run_notes
    networks = sorted({arch for arch, _ in chosen}, key=network_order)
    table_rows: list[dict[str, object]] = []
    cells: dict[tuple[str, str], pd.Series] = {}
    references: dict[tuple[str, str], pd.Series] = {}
    for network in networks:
        out: dict[str, object] = {c: float("nan") for c in COLUMNS}
        out["network"] = network
        for mode, prefix in MODES.items():
            run_key = chosen.get((network, mode))
            names = [f"{prefix}_{k}" for k in ("clean", "targeted", "untargeted")]
            if run_key is None:
                for name in names:
                    if name in CELLS:
                        notes.append(f"{network}: {name} empty: no {mode}-trained run found")
                continue
            run_rows = rows[rows[RUN_KEY] == run_key]
            run_name = str(run_rows["run"].iloc[0])
            out[f"{prefix}_run"] = run_name
            picks = {
                names[0]: pick_clean(run_rows),
                names[1]: pick_attack(run_rows, "targeted", eps, settings),
                names[2]: pick_attack(run_rows, "untargeted", eps, settings),
            }
            for name, (row, why) in picks.items():
                if row is None:
                    if name in CELLS:
                        notes.append(f"{network}: {name} empty: {why} in run {run_name}")
                    continue
                cells[(network, name)] = row
                out[name] = round(float(row["accuracy"]), 1)
                out[f"{name}_low"] = round(float(row["accuracy_low"]), 1)
                out[f"{name}_high"] = round(float(row["accuracy_high"]), 1)
            for reference in REFERENCES:
                row = pick_reference(run_rows, reference, eps, settings)
                if row is None:
                    continue
                name = f"{prefix}_{reference}"
                references[(network, name)] = row
                out[name] = round(float(row["accuracy"]), 1)
                out[f"{name}_low"] = round(float(row["accuracy_low"]), 1)
                out[f"{name}_high"] = round(float(row["accuracy_high"]), 1)
        _threat_columns(out, network, cells, dataset, split, eps, settings)
        table_rows.append(out)
    frame = pd.DataFrame(table_rows, columns=list(COLUMNS))
    for column in ("adv_run", "regular_run"):
        frame[column] = frame[column].map(_text)
    log.info("table 9: %d network(s), %d note(s)", len(frame), len(notes))
    return Table9(frame, cells, chosen, notes, dataset, split, eps, settings, rows, references)


def _threat_columns(
    out: dict[str, object],
    network: str,
    cells: dict[tuple[str, str], pd.Series],
    dataset: str,
    split: str,
    eps: float,
    settings: ReportSettings,
) -> None:
    attacked = [
        cells[(network, name)]
        for name in ("adv_targeted", "adv_untargeted", "regular_targeted", "regular_untargeted")
        if (network, name) in cells
    ]
    targeted = [
        cells[(network, n)] for n in ("adv_targeted", "regular_targeted") if (network, n) in cells
    ]
    every = attacked or [
        cells[(network, n)] for n in ("adv_clean", "regular_clean") if (network, n) in cells
    ]
    out.update(
        dataset=dataset,
        split=split,
        n=_fmt_values([r["n"] for r in every]),
        norm=settings.norm,
        eps=format_eps(eps),
        steps=_fmt_values([r["steps"] for r in attacked]),
        step_size=_fmt_values([eps_text(r["step_size"]) for r in attacked]),
        restarts=_fmt_values([r["restarts"] for r in attacked]),
        target_policy=settings.target_policy if targeted else "",
        targets_seed=_fmt_values([r["targets_seed"] for r in targeted]),
        precision=settings.precision,
    )
