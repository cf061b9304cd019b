"""Table 9 over training seeds: cells are means over seeds with the two-level bootstrap
interval, per-seed values in the seeds CSV, LR-Net - ResNet comparisons with sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_outcome_run

from robustlr.attacks.spec import AttackSpec
from robustlr.eval.stats import paired_difference_bootstrap, seed_image_bootstrap
from robustlr.report import build_table9, collect_results, make_report
from robustlr.report.files import PAIRS_CSV, SEED_PAIRS_CSV, SEEDS_CSV, report_file
from robustlr.report.pairs import NO_DIFFERENCE, pair_table, seed_pair_table
from robustlr.report.table9 import ReportSettings

EPS = 48 / 255
N = 120
CLEAN = AttackSpec("clean")
TARGETED = AttackSpec("pgd-targeted", eps=EPS, steps=10)
UNTARGETED = AttackSpec("pgd-untargeted", eps=EPS, steps=10)
SWEEP = AttackSpec("pgd-untargeted", eps=EPS, steps=100)  # a sweep row on seed 0 only


def _correct(share: float, offset: int) -> np.ndarray:
    """Right on ``share`` of the N images, a block starting at ``offset`` (wrapping)."""
    out = np.zeros(N, dtype=bool)
    out[(offset + np.arange(round(share * N))) % N] = True
    return out


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Three seeds of resnet26 and lrnet26, both modes. Clean: both networks right on the same
    images (no difference). Targeted: LR-Net right on 30 more images than ResNet on every seed
    (LR-Net higher). Untargeted: seeds disagree; seed 0 of each adv run also has a 100-step
    sweep row that the other seeds lack."""
    root = tmp_path / "runs"
    for arch, extra in (("resnet26", 0.0), ("lrnet26", 0.25)):
        for seed in range(3):
            for mode in ("adversarial", "regular"):
                attacks = [
                    (CLEAN, _correct(0.9, 0)),
                    (TARGETED, _correct(0.3 + extra, 0)),
                    (UNTARGETED, _correct(0.1 + 0.1 * seed, 7 * seed)),
                ]
                if seed == 0:
                    attacks.append((SWEEP, _correct(0.02, 0)))
                name = f"{arch}-{mode}-s{seed}"
                write_outcome_run(root, name, arch, mode, attacks, train_seed=str(seed))
    return root


@pytest.mark.slow
def test_cells_are_means_over_seeds_with_the_two_level_interval(study):
    table = build_table9(collect_results(runs_dir=study))
    frame = table.frame.set_index("network")
    untargeted = [_correct(0.1 + 0.1 * s, 7 * s) for s in range(3)]
    expected = seed_image_bootstrap(np.stack(untargeted))
    assert frame.loc["resnet26", "adv_untargeted"] == pytest.approx(20.0, abs=0.05)
    assert frame.loc["resnet26", "adv_untargeted_low"] == pytest.approx(expected.low, abs=0.05)
    assert frame.loc["resnet26", "adv_untargeted_high"] == pytest.approx(expected.high, abs=0.05)
    # the cell holds the 10-step setting every seed has, not seed 0's lone 100-step row
    assert frame.loc["resnet26", "steps"] == "10"
    assert frame.loc["resnet26", "adv_seeds"] == "0/1/2"
    assert frame.loc["lrnet26", "adv_targeted"] == pytest.approx(55.0, abs=0.05)
    assert any("two-level bootstrap" in note for note in table.notes)
    seeds = table.stats[("resnet26", "adv_untargeted")]
    assert seeds.method == "bootstrap" and seeds.seeds == ["0", "1", "2"]


@pytest.mark.slow
def test_comparisons_state_the_difference_and_what_is_resolved(study):
    table = build_table9(collect_results(runs_dir=study))
    pairs = pair_table(table).set_index("cell")
    assert set(pairs["network_a"]) == {"lrnet26"} and set(pairs["network_b"]) == {"resnet26"}
    targeted = pairs.loc["adv_targeted"]
    lr = np.stack([_correct(0.55, 0)] * 3)
    res = np.stack([_correct(0.3, 0)] * 3)
    expected = paired_difference_bootstrap(lr, res)
    assert targeted["difference"] == pytest.approx(25.0)
    assert targeted["difference_low"] == pytest.approx(expected.low, abs=0.05)
    assert targeted["verdict"] == "lrnet26 higher" and targeted["p_value"] < 0.01
    assert targeted["sentence"].startswith(
        "adv_targeted, lrnet26 - resnet26: lrnet26 higher: +25.0 ["
    )
    clean = pairs.loc["adv_clean"]
    assert clean["verdict"] == NO_DIFFERENCE and clean["p_value"] == 1.0
    assert "no difference detected: +0.0 [+0.0, +0.0]" in clean["sentence"]
    per_seed = seed_pair_table(table)
    assert len(per_seed[per_seed["cell"] == "adv_targeted"]) == 3  # McNemar for each seed
    assert (per_seed.loc[per_seed["cell"] == "adv_targeted", "only_a"] == 30).all()


@pytest.mark.slow
def test_report_files_hold_every_seed(study, tmp_path):
    out = tmp_path / "report"
    made = make_report(ReportSettings(), report_file(out), runs_dir=study)
    names = {p.name for p in made.written}
    assert {SEEDS_CSV, PAIRS_CSV, SEED_PAIRS_CSV} <= names
    seeds = pd.read_csv(out / SEEDS_CSV, dtype={"train_seed": str})
    cell = seeds[(seeds["network"] == "resnet26") & (seeds["cell"] == "adv_untargeted")]
    assert sorted(cell["train_seed"]) == ["0", "1", "2"]
    assert sorted(cell["accuracy"].round(1)) == [10.0, 20.0, 30.0]
    md = report_file(out, "md").read_text()
    assert "lrnet26 higher: +25.0" in md and "McNemar per training seed" in md


def test_runs_without_seed_are_one_replicate(tmp_path):
    root = tmp_path / "runs"
    for arch in ("resnet26", "lrnet26"):
        write_outcome_run(root, f"{arch}-adv", arch, "adversarial", [(CLEAN, _correct(0.5, 0))])
    table = build_table9(collect_results(runs_dir=root))
    cell = table.stats[("resnet26", "adv_clean")]
    assert cell.seeds == [""] and cell.method == "bootstrap"
    only = seed_image_bootstrap(_correct(0.5, 0)[None])
    assert (cell.low, cell.high) == pytest.approx((only.low, only.high))
