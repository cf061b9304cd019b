"""Robustness curves: accuracy at every eps, as the per-example worst case over every attack
run on a model.

Each image's breaking eps is the smallest eps at which any attack broke it: 0 where the clean
image is wrong, the smallest adversarial norm a minimum-norm attack (registry ``min_norm``:
FMN, DDN, HopSkipJump) found, and the eps of every fixed-budget attack (PGD, APGD, ...) that
broke it (its adversarial example lies in every larger ball too). An image is robust at eps
only when no attack broke it within eps, so accuracy(eps) = share of images whose breaking eps
is above eps: a step curve over all eps, from per-example outcomes files (``robustlr eval
--save-examples``). Curves are drawn for the runs with a minimum-norm row; the fixed-budget
PGD / APGD rows are marked on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from robustlr.attacks.registry import ATTACKS
from robustlr.report.results import EPS_TOL, RUN_KEY, row_outcome_data

log = logging.getLogger(__name__)

CURVE_PLOT = "robustness_curve_{norm}.png"  # one plot per norm, every network on it
CLEAN = "clean"  # the unattacked row's attack name
MARKED_FAMILIES = ("pgd", "apgd")  # fixed-budget attacks whose rows are marked on the curves


def is_min_norm(attack: str) -> bool:
    """A minimum-norm attack's rows carry per-image norms (False for unknown names)."""
    info = ATTACKS.get(attack)
    return info is not None and info.min_norm


def broken_within(row: pd.Series, eps: float) -> tuple[np.ndarray | None, str]:
    """Which images the attack of result ``row`` broke within ``eps`` (per example, from its
    outcomes file): a minimum-norm row by its norms, the clean row where the model is wrong,
    a fixed-budget row at eps <= ``eps`` where it made the model wrong. (None, why) when the
    row says nothing about ``eps`` or has no usable outcomes file."""
    attack = str(row["attack"])
    if not is_min_norm(attack) and attack != CLEAN and float(row["eps"]) > eps + EPS_TOL:
        return None, f"{attack} ran at a larger eps"
    data, why = row_outcome_data(row)
    if data is None:
        return None, why
    correct = np.asarray(data["correct"], dtype=bool)
    if is_min_norm(attack):
        norms = np.asarray(data["norms"], dtype=np.float64)
        if norms.shape != correct.shape:
            return None, f"the outcomes of {attack} hold no per-image norms"
        return norms <= eps + EPS_TOL, ""
    return ~correct, ""


def breaking_eps(row: pd.Series) -> tuple[np.ndarray | None, str]:
    """Per image, the smallest eps at which the attack of ``row`` broke it (inf: not broken).
    Shape: -> (N,)."""
    data, why = row_outcome_data(row)
    if data is None:
        return None, why
    correct = np.asarray(data["correct"], dtype=bool)
    if is_min_norm(str(row["attack"])):
        norms = np.asarray(data["norms"], dtype=np.float64)
        if norms.shape != correct.shape:
            return None, f"the outcomes of {row['attack']} hold no per-image norms"
        return norms, ""
    eps = 0.0 if row["attack"] == CLEAN else float(row["eps"])
    return np.where(correct, np.inf, eps), ""


@dataclass
class RobustnessCurve:
    """One model's worst-case accuracy at every eps in one norm."""

    label: str  # "arch (training mode)"
    run: str
    norm: str
    breaking: np.ndarray  # (N,) smallest eps at which any attack broke each image (inf: none)
    broken_by: np.ndarray  # (N,) the attack that broke it there ("" where none did)
    attacks: list[str]  # the attacks combined
    marks: list[tuple[str, float, float]] = field(default_factory=list)  # (attack, eps, acc)
    by_attack: dict[str, np.ndarray] = field(default_factory=dict)  # per attack, like breaking

    @property
    def n(self) -> int:
        return len(self.breaking)

    def accuracy(self, eps: float) -> float:
        """Worst-case accuracy (%) at ``eps``: images no attack broke within eps."""
        return 100.0 * float(np.mean(self.breaking > eps + EPS_TOL)) if self.n else float("nan")

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """The step curve: eps values (0 and every finite breaking eps) and the accuracy from
        each on (``where="post"``). Shape: -> (M,), (M,)."""
        finite = self.breaking[np.isfinite(self.breaking)]
        xs = np.unique(np.concatenate([[0.0], finite]))
        return xs, np.array([self.accuracy(float(x)) for x in xs])


def robustness_curves(results: pd.DataFrame, min_norm_only: bool = True) -> list[RobustnessCurve]:
    """A curve per (run, norm, image subset) with at least one minimum-norm row (any attack
    row with ``min_norm_only`` False): every row of the run on those images in that norm (and
    its clean row) combined per example. Rows without a usable outcomes file are left out
    (logged)."""
    curves = []
    chosen = results[results["attack"].map(is_min_norm)] if min_norm_only else results
    chosen = chosen[chosen["attack"] != CLEAN]
    for (run_key, norm, subset), _ in chosen.groupby([RUN_KEY, "norm", "subset_sha256"], sort=True):
        rows = results[
            (results[RUN_KEY] == run_key)
            & (results["subset_sha256"] == subset)
            & ((results["norm"] == norm) | (results["attack"] == CLEAN))
        ]
        curve = _combine(rows, str(norm), min_norm_only)
        if curve is not None:
            curves.append(curve)
    return curves


def _combine(rows: pd.DataFrame, norm: str, min_norm_only: bool) -> RobustnessCurve | None:
    """The rows of one run on one image subset combined per example; the clean row first, so
    that an image the model gets wrong unattacked is broken by ``clean``."""
    rows = pd.concat([rows[rows["attack"] == CLEAN], rows[rows["attack"] != CLEAN]])
    breaking, broken_by, attacks, marks = None, None, [], []
    by_attack: dict[str, np.ndarray] = {}
    first = rows.iloc[0]
    for _, row in rows.iterrows():
        eps, why = breaking_eps(row)
        if eps is None or (breaking is not None and eps.shape != breaking.shape):
            log.info("robustness curve of %s leaves out %s: %s", first["run"], row["attack"], why)
            continue
        name = str(row["attack"])
        if breaking is None:
            breaking, broken_by = eps.copy(), np.where(np.isfinite(eps), name, "")
        else:
            lower = eps < breaking
            breaking = np.where(lower, eps, breaking)
            broken_by = np.where(lower, name, broken_by)
        attacks.append(name)
        by_attack[name] = np.minimum(by_attack[name], eps) if name in by_attack else eps.copy()
        info = ATTACKS.get(name)
        if info is not None and info.family in MARKED_FAMILIES:
            marks.append((name, float(row["eps"]), float(row["accuracy"])))
    if breaking is None or (min_norm_only and not any(is_min_norm(a) for a in attacks)):
        return None
    label = f"{first['arch']} ({first['train_mode']})"
    return RobustnessCurve(
        label, str(first["run"]), norm, breaking, broken_by, attacks, marks, by_attack
    )


BROKEN_BY_COLUMNS = (
    "run", "network", "norm", "eps", "n", "attack", "broken", "first", "only", "unbroken",
)  # fmt: skip


def broken_by_table(results: pd.DataFrame, eps: float, norm: str) -> pd.DataFrame:
    """Which attack broke which images, per run (and image subset) at ``eps`` in ``norm``,
    from every row of the run with an outcomes file, minimum-norm or not. ``clean``: the
    images the model gets wrong unattacked (counted under no attack). Per attack (its rows
    combined), among the other images: those it broke within eps (``broken``), those it broke
    first, i.e. at the smallest eps of all the run's attacks (``first``: the curve's
    ``broken_by``; a tie goes to the earlier row), and those no other attack broke within eps
    (``only``). ``unbroken``: the images no attack broke within eps; the ``first`` counts and
    ``unbroken`` add up to ``n`` (``BROKEN_BY_COLUMNS``)."""
    rows = []
    in_norm = results[(results["norm"] == norm) | (results["attack"] == CLEAN)]
    for curve in robustness_curves(in_norm, False):
        within = {a: b <= eps + EPS_TOL for a, b in curve.by_attack.items()}
        wrong = within.pop(CLEAN, np.zeros(curve.n, dtype=bool))
        within_eps = curve.breaking <= eps + EPS_TOL
        counts = {CLEAN: (wrong, wrong, wrong)} if CLEAN in curve.by_attack else {}
        for attack, broken in within.items():
            others = [w for a, w in within.items() if a != attack]
            broken = broken & ~wrong
            alone = broken & ~np.any(others, axis=0) if others else broken
            counts[attack] = (broken, within_eps & (curve.broken_by == attack), alone)
        for attack, (broken, first, alone) in counts.items():
            rows.append(
                {
                    "run": curve.run,
                    "network": curve.label,
                    "norm": norm,
                    "eps": eps,
                    "n": curve.n,
                    "attack": attack,
                    "broken": int(broken.sum()),
                    "first": int(first.sum()),
                    "only": int(alone.sum()),
                    "unbroken": int((~within_eps).sum()),
                }
            )
    return pd.DataFrame(rows, columns=list(BROKEN_BY_COLUMNS))


def plot_robustness_curves(results: pd.DataFrame, directory: str | Path) -> list[Path]:
    """One plot per norm (``CURVE_PLOT``): every run's worst-case accuracy-vs-eps step curve
    (LR-Net and ResNet together), its fixed-budget PGD / APGD rows marked. [] without a
    minimum-norm row."""
    by_norm: dict[str, list[RobustnessCurve]] = {}
    for curve in robustness_curves(results):
        by_norm.setdefault(curve.norm, []).append(curve)
    written = []
    for norm, curves in sorted(by_norm.items()):
        scale = 255.0 if norm == "linf" else 1.0
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for curve in curves:
            xs, ys = curve.steps()
            label = f"{curve.label}, {curve.run} (n={curve.n})"
            (line,) = ax.step(xs * scale, ys, where="post", label=label)
            for attack, eps, accuracy in curve.marks:
                ax.plot(eps * scale, accuracy, "x", color=line.get_color(), markersize=7)
                ax.annotate(attack, (eps * scale, accuracy), fontsize=6, color=line.get_color())
        ax.set_xlabel("eps (x 1/255)" if norm == "linf" else f"eps ({norm})")
        ax.set_ylabel("worst-case accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Robustness curves ({norm}): per-example worst case; x: fixed-budget rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = Path(directory) / CURVE_PLOT.format(norm=norm)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
        written.append(path)
    return written
