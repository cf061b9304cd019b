"""Table 9 as CSV, Markdown (with notes, paired tests and sanity checks), LaTeX, and the data
of a rich terminal table."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from robustlr.report.checks import CheckResult, checks_frame
from robustlr.report.files import (
    BROKEN_BY_CSV,
    CHECKS_CSV,
    FORMATS,
    PAIRS_CSV,
    SEED_PAIRS_CSV,
    SEEDS_CSV,
)
from robustlr.report.table9 import (
    CELLS,
    REFERENCE_CELLS,
    TABLE9_COLUMNS,
    Table9,
    eps_text,
    seed_frame,
)

log = logging.getLogger(__name__)

BROKEN_BY_MARKDOWN_COLUMNS = (
    "network",
    "run",
    "n",
    "attack",
    "broken",
    "first",
    "only",
    "unbroken",
)

HEADERS = {
    "adv_clean": "adv. clean",
    "adv_targeted": "adv. targeted",
    "adv_untargeted": "adv. untargeted",
    "regular_clean": "regular clean",
}


def cell_text(value: object, digits: int = 1) -> str:
    """A number with ``digits`` decimals; "" for a missing value."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def _with_interval(row: pd.Series, cell: str) -> str:
    value = row[cell]
    if pd.isna(value):
        return ""
    return f"{value:.1f} [{row[f'{cell}_low']:.1f}, {row[f'{cell}_high']:.1f}]"


def write_csv(table: Table9, path: str | Path) -> Path:
    """The table as CSV: ``network,adv_clean,adv_targeted,adv_untargeted,regular_clean`` first,
    then intervals and threat model; empty fields for missing cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.frame.to_csv(path, index=False, na_rep="", float_format="%.1f")
    return path


def write_frame(frame: pd.DataFrame, path: str | Path) -> Path:
    """Any report frame (checks, pairs) as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, na_rep="")
    return path


def _md_escape(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = [
        "| " + " | ".join(_md_escape(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _seed_pair_rows(pairs: pd.DataFrame) -> list[list[str]]:
    rows = []
    for _, p in pairs.iterrows():
        tested = pd.notna(p["p_value"])
        rows.append(
            [
                p["cell"],
                f"{p['network_a']} vs {p['network_b']}",
                str(p["train_seed"]) or "-",
                f"{p['accuracy_a']:.1f} vs {p['accuracy_b']:.1f}",
                f"{p['difference']:+.1f}",
                f"{int(p['only_a'])} / {int(p['only_b'])}" if tested else "",
                f"{p['p_value']:.3g}" if tested else "",
                p["note"],
            ]
        )
    return rows


def _comparison_section(pairs: pd.DataFrame | None, seed_pairs: pd.DataFrame | None) -> list[str]:
    """Markdown lines: one sentence per comparison, then McNemar per seed."""
    parts: list[str] = []
    if pairs is not None and len(pairs):
        parts += [
            "",
            "## LR-Net against ResNet (difference of means over seeds, A - B)",
            "",
            "Paired on the same images and targets; 95% interval and p-value from the "
            "two-level bootstrap (seeds of each network and images drawn anew in each "
            "replicate, one image draw for both networks). A difference is resolved when its "
            "interval excludes 0.",
            "",
            *(f"- {_md_escape(text)}" for text in pairs["sentence"]),
        ]
    if seed_pairs is not None and len(seed_pairs):
        parts += [
            "",
            "## McNemar per training seed (exact binomial test on discordant images)",
            "",
            markdown_table(
                ["cell", "networks", "seed", "accuracy", "diff", "only a / only b", "p", "note"],
                _seed_pair_rows(seed_pairs),
            ),
        ]
    return parts


def _broken_by_section(broken_by: pd.DataFrame | None) -> list[str]:
    """Markdown lines: per run, which attack broke the images at Table 9's eps (none without
    per-example outcomes)."""
    if broken_by is None or not len(broken_by):
        return []
    first = broken_by.iloc[0]
    return [
        "",
        f"## Which attack broke the images ({first['norm']} eps {eps_text(first['eps'])}, "
        f"`{BROKEN_BY_CSV}`)",
        "",
        "Per run of the table, from the per-example outcomes of every attack run on it: the "
        "images each attack broke within eps, broke first (at the smallest eps of all the "
        "run's attacks; clean: already wrong) and broke alone; unbroken: no attack broke them.",
        "",
        markdown_table(
            list(BROKEN_BY_MARKDOWN_COLUMNS),
            [[str(r[c]) for c in BROKEN_BY_MARKDOWN_COLUMNS] for _, r in broken_by.iterrows()],
        ),
    ]


def to_markdown(
    table: Table9,
    pairs: pd.DataFrame | None = None,
    checks: list[CheckResult] | None = None,
    seed_pairs: pd.DataFrame | None = None,
    broken_by: pd.DataFrame | None = None,
) -> str:
    """The report as Markdown: Table 9 (means over seeds), intervals and threat model, notes,
    which attack broke the images, comparisons with their sentences, McNemar per seed,
    checks."""
    frame = table.frame
    parts = [
        "# Table 9: robustness to white-box attacks (top-1 %, mean over training seeds)",
        "",
        f"{table.dataset} ({table.split}), {table.settings.norm} eps {eps_text(table.eps)}, "
        f"{table.settings.precision}. Adversarial train: clean, targeted and untargeted PGD; "
        "regular train: clean.",
        "",
        markdown_table(
            list(TABLE9_COLUMNS),
            [[str(r["network"]), *(cell_text(r[c]) for c in CELLS)] for _, r in frame.iterrows()],
        ),
        "",
        "## Intervals (95%, method in the notes) and threat model",
        "",
        markdown_table(
            ["network", *CELLS, "n", "steps", "step size", "restarts", "targets", "seeds", "runs"],
            [
                [
                    str(r["network"]),
                    *(_with_interval(r, c) for c in CELLS),
                    str(r["n"]),
                    str(r["steps"]),
                    str(r["step_size"]),
                    str(r["restarts"]),
                    f"{r['target_policy']} (seed {r['targets_seed']})"
                    if r["target_policy"]
                    else "",
                    _seeds_text(r),
                    " / ".join(x for x in (r["adv_run"], r["regular_run"]) if x),
                ]
                for _, r in frame.iterrows()
            ],
        ),
    ]
    parts += _reference_section(table)
    if table.notes:
        parts += ["", "## Notes", "", *(f"- {_md_escape(n)}" for n in table.notes)]
    parts += _broken_by_section(broken_by)
    parts += _comparison_section(pairs, seed_pairs)
    if checks:
        parts += [
            "",
            "## Sanity checks",
            "",
            markdown_table(
                ["check", "status", "subject", "numbers", "explanation"],
                [[c.check, c.status.upper(), c.subject, c.numbers, c.message] for c in checks],
            ),
        ]
    return "\n".join(parts) + "\n"


def _seeds_text(row: pd.Series) -> str:
    """``adv 0/1/2, regular 0/1/2`` (the training seeds behind a network's cells)."""
    return ", ".join(
        f"{mode} {row[f'{mode}_seeds']}" for mode in ("adv", "regular") if row[f"{mode}_seeds"]
    )


def _reference_section(table: Table9) -> list[str]:
    """Markdown lines: per network, Table 9's untargeted PGD beside the reference attacks
    (APGD-CE, standard AutoAttack) on the same run; none when no reference row exists."""
    frame = table.frame
    present = [c for c in REFERENCE_CELLS if frame[c].notna().any()]
    if not present:
        return []
    columns = []
    for mode in ("adv", "regular"):
        mode_cells = [c for c in present if c.startswith(f"{mode}_")]
        if mode_cells:
            columns += [f"{mode}_untargeted", *mode_cells]
    return [
        "",
        "## Stronger attacks beside Table 9 (not in the paper)",
        "",
        "The paper's PGD (a few small steps from a random start) cannot always reach the edge of "
        "the eps ball; APGD-CE and AutoAttack at the same eps show how optimistic it is.",
        "",
        markdown_table(
            ["network", *columns],
            [
                [str(r["network"]), *(_with_interval(r, c) for c in columns)]
                for _, r in frame.iterrows()
            ],
        ),
    ]


def _tex(text: object) -> str:
    out = str(text)
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&")):
        out = out.replace(char, escaped)
    return out.replace("#", r"\#")


def to_latex(table: Table9) -> str:
    """The table in the paper's layout (booktabs): adversarial train clean / targeted /
    untargeted, regular train clean; the best value of each column in bold."""
    frame = table.frame
    best = {c: frame[c].max() for c in CELLS}
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{lcccc}",
        r"\toprule",
        r"network & \multicolumn{3}{c}{adversarial train} & regular train \\",
        r"\cmidrule(lr){2-4}\cmidrule(lr){5-5}",
        r" & clean & \emph{targeted} & \emph{untargeted} & clean \\",
        r"\midrule",
    ]
    for _, row in frame.iterrows():
        cells = []
        for c in CELLS:
            text = cell_text(row[c])
            bold = text and len(frame) > 1 and row[c] == best[c]
            cells.append(rf"\textbf{{{text}}}" if bold else text)
        lines.append(" & ".join([_tex(row["network"]), *cells]) + r" \\")
    caption = (
        f"Robustness to white-box attacks (top-1 acc \\%), {_tex(table.dataset)} "
        f"{_tex(table.split)}, {_tex(table.settings.norm)} $\\epsilon$ = {eps_text(table.eps)}."
    )
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def rich_table_data(table: Table9) -> dict[str, object]:
    """What a terminal table shows: ``title``, ``columns`` (names) and ``rows`` (strings);
    the reference columns (APGD-CE, AutoAttack) follow Table 9's when any is filled."""
    references = [c for c in REFERENCE_CELLS if table.frame[c].notna().any()]
    columns = ["network", *(HEADERS[c] for c in CELLS), *references, "n", "steps", "runs"]
    rows = [
        [
            str(r["network"]),
            *(_with_interval(r, c) for c in (*CELLS, *references)),
            str(r["n"]),
            str(r["steps"]),
            " / ".join(x for x in (r["adv_run"], r["regular_run"]) if x),
        ]
        for _, r in table.frame.iterrows()
    ]
    title = (
        f"Table 9: top-1 % mean over seeds [95%], {table.dataset} {table.split}, "
        f"{table.settings.norm} eps {eps_text(table.eps)}"
    )
    return {"title": title, "columns": columns, "rows": rows}


def write_report(
    table: Table9,
    out: str | Path,
    fmt: str = "csv",
    pairs: pd.DataFrame | None = None,
    checks: list[CheckResult] | None = None,
    seed_pairs: pd.DataFrame | None = None,
    broken_by: pd.DataFrame | None = None,
) -> list[Path]:
    """Write the table to ``out`` in ``fmt``; with csv also its Markdown twin (same stem, .md).
    ``table9_seeds.csv`` (every seed's value), ``checks.csv``, ``pairs.csv``,
    ``pairs_seeds.csv`` and ``broken_by.csv`` (when given and not empty) go next to it.
    Returns the paths written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt == "csv":
        written.append(write_csv(table, out))
        md = out.with_suffix(".md")
        md.write_text(to_markdown(table, pairs, checks, seed_pairs, broken_by))
        written.append(md)
    elif fmt == "md":
        out.write_text(to_markdown(table, pairs, checks, seed_pairs, broken_by))
        written.append(out)
    else:
        out.write_text(to_latex(table))
        written.append(out)
    written.append(write_frame(seed_frame(table), out.parent / SEEDS_CSV))
    if checks is not None:
        written.append(write_frame(checks_frame(checks), out.parent / CHECKS_CSV))
    if pairs is not None:
        written.append(write_frame(pairs, out.parent / PAIRS_CSV))
    if seed_pairs is not None:
        written.append(write_frame(seed_pairs, out.parent / SEED_PAIRS_CSV))
    if broken_by is not None and len(broken_by):
        written.append(write_frame(broken_by, out.parent / BROKEN_BY_CSV))
    log.info("wrote %s", ", ".join(map(str, written)))
    return written
