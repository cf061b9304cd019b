"""The paper's Table 9 from evaluation results: per network, its adversarially trained runs'
clean / targeted-PGD / untargeted-PGD accuracy and its regular-trained runs' clean accuracy,
each a mean over training seeds with a 95% interval.

Choices (stated in the report's notes):

* dataset and split: the given ones; else the only dataset in the results (several: an error)
  and the "test" split if present, else "val", else the first.
* eps: the given one; else 16/255 (the paper's) if any PGD row has it; else the eps of most
  PGD rows (ties: the smaller).
* replicates: runs are grouped by network and training mode; each training seed (eval
  column ``train_seed``; rows without one are a single replicate) is a replicate, and per
  seed the newest run counts, i.e. the one whose eval.csv was modified last (ties: the later
  run name); ``runs`` restricts the candidates to named runs.
* attack cells: PGD rows at the report's eps, norm and precision (fp32), targeted with target
  policy "random" (Kannan et al.) or untargeted; with ``attack_steps`` only rows with that
  many steps. Every seed of a cell holds the same setting: among the settings all seeds have,
  the one on the most images (sweeps on subsets do not fill the table), then the strongest
  (lowest mean accuracy), then the most steps (``pick_across_seeds``).
* clean cells: the clean row on the most images.
* a cell's value is the mean over its seeds, its interval the two-level bootstrap over seeds
  and images (``cell_stats``; docs/statistics.md).
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

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from robustlr.attacks.registry import ATTACKS, names_where
from robustlr.attacks.spec import format_eps
from robustlr.eval.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, seed_image_bootstrap
from robustlr.report.results import (
    MTIME,
    ROW,
    RUN_KEY,
    TRAIN_SEED,
    ResultsError,
    eps_matches,
    row_outcomes,
)

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
    "adv_seeds",
    "regular_seeds",
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
    """The table (``frame``, one row per network, ``COLUMNS``: each cell the mean over the
    training seeds with its 95% interval), the first seed's result row behind every filled
    cell, the first seed's run per (network, training mode), every seed's (``replicates``,
    ``stats``), and the notes."""

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
    # per (network, training mode): {train seed: run key}; ``runs`` holds the first seed's
    replicates: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict, repr=False)
    # per (network, cell or reference cell): the cell over its seeds
    stats: dict[tuple[str, str], CellStats] = field(default_factory=dict, repr=False)

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


def seed_order(seed: str) -> tuple[int, float, str]:
    """Training seeds in numeric order; "" (no recorded seed) first."""
    try:
        return (1, float(seed), seed)
    except ValueError:
        return (0 if seed == "" else 2, 0.0, seed)


def choose_runs(
    rows: pd.DataFrame,
) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """The replicates of each (arch, training mode): per training seed (``train_seed``; runs
    without one are one replicate) the newest run, i.e. the one whose eval.csv was modified
    last (ties: the later run name); and notes on the choices made."""
    chosen: dict[tuple[str, str], dict[str, str]] = {}
    notes: list[str] = []
    runs = rows.groupby([RUN_KEY], sort=False).agg(
        arch=("arch", "first"),
        mode=("train_mode", "first"),
        run=("run", "first"),
        seed=(TRAIN_SEED, "max"),
        mtime=(MTIME, "max"),
    )
    for (arch, mode), group in runs.groupby(["arch", "mode"], sort=True):
        if mode not in MODES:
            notes.append(
                f"{arch}: run(s) {', '.join(group['run'])} ignored: training mode {mode!r} is "
                "neither 'adversarial' nor 'regular'"
            )
            continue
        replicates: dict[str, str] = {}
        for seed in sorted(set(group["seed"]), key=seed_order):
            ordered = group[group["seed"] == seed].sort_values(["mtime", "run"])
            replicates[seed] = str(ordered.index[-1])
            if len(ordered) > 1:
                which = f" seed {seed}" if seed else ""
                notes.append(
                    f"{arch} ({mode}{which}): {len(ordered)} runs; using the newest, "
                    f"{ordered['run'].iloc[-1]} (others: {', '.join(ordered['run'].iloc[:-1])})"
                )
        chosen[(arch, mode)] = replicates
    return chosen, notes


def clean_candidates(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """A run's clean rows (fp32 when there are any), or (empty, why not)."""
    clean = rows[rows["attack"] == "clean"]
    if clean.empty:
        return clean, "no clean row"
    fp32 = clean[clean["precision"] == "fp32"]
    return (fp32 if len(fp32) else clean), ""


def attack_candidates(
    rows: pd.DataFrame, kind: str, eps: float, settings: ReportSettings
) -> tuple[pd.DataFrame, str]:
    """A run's PGD rows of ``kind`` ("targeted" or "untargeted") at the report's threat model,
    or (empty, why there are none)."""
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
    return found, "" if len(found) else f"no {what} row at {where}"


def reference_candidates(
    rows: pd.DataFrame, reference: str, eps: float, settings: ReportSettings
) -> tuple[pd.DataFrame, str]:
    """A run's rows of a reference attack (``REFERENCES``) at ``eps`` and the report's norm."""
    found = rows[
        rows["attack"].isin(REFERENCES[reference])
        & eps_matches(rows["eps"], eps)
        & (rows["norm"] == settings.norm)
    ]
    return found, "" if len(found) else f"no {reference} row"


def _setting(row: pd.Series) -> tuple[object, ...]:
    """What must be equal for rows of several seeds to fill one cell: attack, images, steps,
    step size, restarts, precision, targets."""
    step = row["step_size"]
    return (
        row["attack"],
        int(row["n"]),
        row["subset_sha256"],
        row["steps"] if pd.notna(row["steps"]) else -1,
        round(float(step), 9) if pd.notna(step) else -1.0,
        row["restarts"] if pd.notna(row["restarts"]) else -1,
        row["precision"],
        row["targets_sha256"],
    )


def pick_across_seeds(
    candidates: dict[str, pd.DataFrame],
) -> tuple[dict[str, pd.Series], str]:
    """One row per seed for a cell, all of one setting (``_setting``): among the settings every
    seed has, the one on the most images, then the strongest (lowest mean accuracy over the
    seeds), then the most steps; within a seed, duplicates resolve to the latest row. When no
    setting is shared by all seeds, each seed's own strongest row on its most images, and a
    note says so."""
    per_seed: dict[str, dict[tuple[object, ...], pd.Series]] = {}
    for seed, found in candidates.items():
        ordered = found.sort_values(["accuracy", MTIME, ROW], ascending=[False, True, True])
        per_seed[seed] = {_setting(r): r for _, r in ordered.iterrows()}  # last: lowest, latest
    common = set.intersection(*(set(v) for v in per_seed.values())) if per_seed else set()
    if common:

        def score(key: tuple[object, ...]) -> tuple[float, float, float]:
            mean = sum(float(v[key]["accuracy"]) for v in per_seed.values()) / len(per_seed)
            return (-float(key[1]), mean, -float(key[3]))  # type: ignore[arg-type]

        best = min(common, key=score)
        return {seed: v[best] for seed, v in per_seed.items()}, ""
    out = {}
    for seed, found in candidates.items():
        found = found[found["n"] == found["n"].max()]
        out[seed] = found.sort_values(
            ["accuracy", "steps", MTIME, ROW], ascending=[True, False, False, False]
        ).iloc[0]
    return out, "its seeds share no attack setting (each seed's strongest row is used)"


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


@dataclass
class CellStats:
    """One cell over its seeds: the mean accuracy (%), its 95% interval and how it was found
    (``METHODS``), the row of each seed, and the (seeds, images) outcomes when every seed has
    them on the same images (None otherwise)."""

    mean: float
    low: float
    high: float
    method: str
    rows: dict[str, pd.Series]
    outcomes: np.ndarray | None
    note: str = ""

    @property
    def seeds(self) -> list[str]:
        return list(self.rows)


BOOTSTRAP, WILSON, SEED_BOOTSTRAP = "bootstrap", "wilson", "seed-bootstrap"
METHODS = {
    BOOTSTRAP: "two-level bootstrap over training seeds and test images (seeds and images "
    f"crossed: one image draw shared by all seeds; {BOOTSTRAP_RESAMPLES} replicates, "
    "percentile interval; robustlr.eval.stats)",
    WILSON: "Wilson score interval of the single run (no per-example outcomes file)",
    SEED_BOOTSTRAP: "bootstrap over the seeds' accuracies only (scipy.stats.bootstrap, "
    "percentile): per-example outcomes are missing, so image variance is left out",
}


def cell_stats(rows: dict[str, pd.Series]) -> CellStats:
    """Mean over seeds and its interval: the two-level bootstrap when every seed's outcomes
    file is there and on the same images and targets; else, one seed: its Wilson interval;
    several: a bootstrap of the seeds' accuracies (image variance missing, noted)."""
    accuracies = np.array([float(r["accuracy"]) for r in rows.values()])
    loaded = [row_outcomes(r) for r in rows.values()]
    keys = {(r["subset_sha256"], r["targets_sha256"]) for r in rows.values()}
    lengths = {len(c) for c, _ in loaded if c is not None}
    whys = [why for c, why in loaded if c is None]
    if not whys and len(keys) == 1 and len(lengths) == 1:
        matrix = np.stack([c for c, _ in loaded if c is not None])
        result = seed_image_bootstrap(matrix)
        return CellStats(result.estimate, result.low, result.high, BOOTSTRAP, rows, matrix)
    why = whys[0] if whys else "the seeds were evaluated on different images or targets"
    if len(rows) == 1:
        row = next(iter(rows.values()))
        low, high = float(row["accuracy_low"]), float(row["accuracy_high"])
        return CellStats(float(accuracies[0]), low, high, WILSON, rows, None)
    ci = scipy_stats.bootstrap(
        (accuracies,), np.mean, method="percentile", random_state=BOOTSTRAP_SEED
    ).confidence_interval
    note = f"interval over {len(rows)} seeds only ({why})"
    return CellStats(
        float(accuracies.mean()), float(ci.low), float(ci.high), SEED_BOOTSTRAP, rows, None, note
    )


def interval_note(stats: dict[tuple[str, str], CellStats]) -> str:
    """The notes line naming how the intervals were computed, and for which cells."""
    if not stats:
        return "intervals (95%): no filled cell"
    used: dict[str, int] = {}
    for cell in stats.values():
        used[cell.method] = used.get(cell.method, 0) + 1
    seeds = sorted({len(c.rows) for c in stats.values()})
    parts = [f"{count} cell(s): {METHODS[m]}" for m, count in used.items()]
    return (
        "intervals (95%): "
        + "; ".join(parts)
        + f". Cells average {'/'.join(map(str, seeds))} training seed(s); per-seed values "
        "are in the seeds CSV"
    )


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
        f"{settings.precision}; attack cells hold, among the PGD settings every training seed "
        "has, the one on the most images with the lowest mean accuracy"
        + (f" with {settings.attack_steps} steps" if settings.attack_steps else "")
    ]
    chosen, run_notes = choose_runs(rows)
    notes += run_notes
    networks = sorted({arch for arch, _ in chosen}, key=network_order)
    table_rows: list[dict[str, object]] = []
    cells: dict[tuple[str, str], pd.Series] = {}
    references: dict[tuple[str, str], pd.Series] = {}
    stats: dict[tuple[str, str], CellStats] = {}
    for network in networks:
        out: dict[str, object] = {c: float("nan") for c in COLUMNS}
        out["network"] = network
        for mode, prefix in MODES.items():
            replicates = chosen.get((network, mode))
            names = [f"{prefix}_{k}" for k in ("clean", "targeted", "untargeted")]
            if not replicates:
                for name in names:
                    if name in CELLS:
                        notes.append(f"{network}: {name} empty: no {mode}-trained run found")
                continue
            run_rows = {seed: rows[rows[RUN_KEY] == key] for seed, key in replicates.items()}
            run_names = {seed: str(r["run"].iloc[0]) for seed, r in run_rows.items()}
            out[f"{prefix}_run"] = "/".join(run_names.values())
            out[f"{prefix}_seeds"] = "/".join(s or "-" for s in replicates)
            finders = {
                names[0]: clean_candidates,
                names[1]: lambda r: attack_candidates(r, "targeted", eps, settings),
                names[2]: lambda r: attack_candidates(r, "untargeted", eps, settings),
                **{
                    f"{prefix}_{ref}": lambda r, ref=ref: reference_candidates(
                        r, ref, eps, settings
                    )
                    for ref in REFERENCES
                },
            }
            for name, finder in finders.items():
                found = {seed: finder(r) for seed, r in run_rows.items()}
                missing = {seed: why for seed, (f, why) in found.items() if f.empty}
                if missing:
                    if name in CELLS:
                        seed, why = next(iter(missing.items()))
                        notes.append(f"{network}: {name} empty: {why} in run {run_names[seed]}")
                    continue
                picked, why = pick_across_seeds({seed: f for seed, (f, _) in found.items()})
                if why:
                    notes.append(f"{network}: {name}: {why}")
                first = next(iter(picked.values()))
                (references if name not in names else cells)[(network, name)] = first
                cell = cell_stats(picked)
                stats[(network, name)] = cell
                if cell.note:
                    notes.append(f"{network}: {name}: {cell.note}")
                out[name] = round(cell.mean, 1)
                out[f"{name}_low"] = round(cell.low, 1)
                out[f"{name}_high"] = round(cell.high, 1)
        _threat_columns(out, network, cells, dataset, split, eps, settings)
        table_rows.append(out)
    frame = pd.DataFrame(table_rows, columns=list(COLUMNS))
    for column in ("adv_run", "regular_run", "adv_seeds", "regular_seeds"):
        frame[column] = frame[column].map(_text)
    notes.append(interval_note(stats))
    runs = {key: next(iter(reps.values())) for key, reps in chosen.items()}
    log.info("table 9: %d network(s), %d note(s)", len(frame), len(notes))
    return Table9(
        frame,
        cells,
        runs,
        notes,
        dataset,
        split,
        eps,
        settings,
        rows,
        references,
        replicates=chosen,
        stats=stats,
    )


SEED_COLUMNS = (
    "network",
    "cell",
    "train_seed",
    "run",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "n",
    "attack",
    "steps",
    "restarts",
    "method",
)


def seed_frame(table: Table9) -> pd.DataFrame:
    """Every seed's value behind every filled cell (Table 9's and the reference cells): one row
    per (network, cell, training seed) with its Wilson interval, and how the cell's interval
    over seeds was computed (``METHODS``)."""
    rows = []
    for (network, cell), cell_stats_ in table.stats.items():
        for seed, row in cell_stats_.rows.items():
            rows.append(
                {
                    "network": network,
                    "cell": cell,
                    "train_seed": seed,
                    "run": row["run"],
                    "accuracy": float(row["accuracy"]),
                    "accuracy_low": float(row["accuracy_low"]),
                    "accuracy_high": float(row["accuracy_high"]),
                    "n": int(row["n"]),
                    "attack": row["attack"],
                    "steps": row["steps"],
                    "restarts": row["restarts"],
                    "method": cell_stats_.method,
                }
            )
    return pd.DataFrame(rows, columns=list(SEED_COLUMNS))


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
