"""Reports: Table 9 from result CSVs, paired tests, sanity checks, plots, CLI commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import REPORT_EPS, row, write_run

from robustlr.attacks.spec import AttackSpec
from robustlr.checkpoint import save_checkpoint
from robustlr.cli.report import check, report
from robustlr.cli.viz import viz
from robustlr.eval.runner import AttackResult, save_outcomes
from robustlr.models import create_model
from robustlr.report import ReportSettings, build_table9, collect_results, pair_table, run_checks
from robustlr.report.checks import checks_frame
from robustlr.report.files import SEEDS_CSV
from robustlr.report.live_checks import check_determinism
from robustlr.report.pairs import seed_pair_table
from robustlr.report.plots import (
    geo_prior_maps,
    plot_geo_priors,
    plot_image_grid,
    report_plots,
)
from robustlr.report.results import ResultsError
from robustlr.report.writers import to_latex, to_markdown, write_report

EPS = REPORT_EPS
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Four runs like the paper's Table 9, with an lrnet26 cell missing, a step sweep whose
    accuracy rises (a failing check) and a regular lrnet26 that is not broken by PGD."""
    root = tmp_path / "runs"
    write_run(root, "resnet26-adv", "resnet26", "adversarial", [
        row("clean", 44.9),
        row("pgd-targeted", 37.9),
        row("pgd-untargeted", 14.4),
        row("pgd-untargeted", 15.0, steps=10, step_size=2 / 255),
        row("pgd-untargeted", 20.0, steps=50, step_size=0.4 / 255),
    ])  # fmt: skip
    write_run(root, "resnet26-regular", "resnet26", "regular", [
        row("clean", 72.8),
        row("pgd-targeted", 1.0),
        row("pgd-untargeted", 0.5),
    ])  # fmt: skip
    write_run(root, "lrnet26-adv", "lrnet26", "adversarial", [
        row("clean", 52.1),
        row("pgd-targeted", 44.2),
    ])  # fmt: skip
    write_run(root, "lrnet26-regular", "lrnet26", "regular", [
        row("clean", 75.7),
        row("pgd-untargeted", 30.0),
    ])  # fmt: skip
    return root


def test_table9_layout_values_and_missing_cell(runs):
    table = build_table9(collect_results(runs_dir=runs))
    frame = table.frame.set_index("network")
    assert list(table.frame.columns[:5]) == [
        "network", "adv_clean", "adv_targeted", "adv_untargeted", "regular_clean"
    ]  # fmt: skip
    assert list(frame.index) == ["resnet26", "lrnet26"]
    cells = ["adv_clean", "adv_targeted", "adv_untargeted", "regular_clean"]
    assert frame.loc["resnet26", cells].tolist() == [44.9, 37.9, 14.4, 72.8]
    assert frame.loc["resnet26", "steps"] == "20"  # the strongest of the 10/20/50-step rows
    assert (
        frame.loc["resnet26", "adv_untargeted_low"]
        < 14.4
        < frame.loc["resnet26", "adv_untargeted_high"]
    )
    assert np.isnan(frame.loc["lrnet26", "adv_untargeted"])
    assert any("lrnet26: adv_untargeted empty" in note for note in table.notes)
    assert frame.loc["lrnet26", "eps"] == "16/255"


def test_attack_steps_pins_the_rows(runs):
    table = build_table9(collect_results(runs_dir=runs), ReportSettings(attack_steps=10))
    frame = table.frame.set_index("network")
    assert frame.loc["resnet26", "adv_untargeted"] == 15.0
    assert np.isnan(frame.loc["resnet26", "adv_targeted"])  # no 10-step targeted row


def test_newest_run_wins(runs):
    import os

    newer = write_run(runs, "resnet26-adv-2", "resnet26", "adversarial", [row("clean", 50.0)])
    os.utime(newer / "eval.csv", (4e9, 4e9))
    table = build_table9(collect_results(runs_dir=runs))
    assert table.frame.set_index("network").loc["resnet26", "adv_clean"] == 50.0
    assert any("using the newest, resnet26-adv-2" in note for note in table.notes)


def test_checks_catch_a_rising_step_sweep_and_a_strong_regular_model(runs):
    table = build_table9(collect_results(runs_dir=runs))
    checks = run_checks(table.results, table)
    by = {(c.check, c.subject.split()[0]): c for c in checks}
    assert by[("more_steps", "resnet26-adv")].status == "fail"
    assert "50: 20.0%" in by[("more_steps", "resnet26-adv")].numbers
    assert by[("regular_near_zero", "resnet26")].status == "pass"
    assert by[("regular_near_zero", "lrnet26")].status == "fail"
    assert by[("untargeted_le_targeted", "resnet26-adv")].status == "pass"
    assert by[("zero_gradients", "resnet26-adv")].status == "pass"
    assert by[("eps_sweep", "all")].status == "skip"
    assert set(checks_frame(checks).columns) == {"check", "status", "subject", "numbers", "message"}


def test_untargeted_above_targeted_fails(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "r", "resnet26", "adversarial", [
        row("clean", 60.0), row("pgd-targeted", 20.0), row("pgd-untargeted", 40.0)
    ])  # fmt: skip
    checks = run_checks(collect_results(runs_dir=root))
    (c,) = [c for c in checks if c.check == "untargeted_le_targeted"]
    assert c.status == "fail" and "untargeted 40.0% vs targeted 20.0%" in c.numbers


def test_writers(runs, tmp_path):
    table = build_table9(collect_results(runs_dir=runs))
    pairs = pair_table(table)
    checks = run_checks(table.results, table)
    written = write_report(table, tmp_path / "out" / "table9.csv", "csv", pairs, checks)
    names = {p.name for p in written}
    assert names == {"table9.csv", "table9.md", "checks.csv", "pairs.csv", SEEDS_CSV}
    text = (tmp_path / "out" / "table9.csv").read_text().splitlines()
    assert text[0].startswith("network,adv_clean,adv_targeted,adv_untargeted,regular_clean,")
    assert text[1].startswith("resnet26,44.9,37.9,14.4,72.8,")
    assert text[2].startswith("lrnet26,52.1,44.2,,75.7,")
    md = to_markdown(table, pairs, checks)
    assert "| resnet26 | 44.9 | 37.9 | 14.4 | 72.8 |" in md and "## Sanity checks" in md
    assert "FAIL" in md
    latex = to_latex(table)
    assert r"\textbf{52.1}" in latex and "resnet26 & 44.9" in latex


def _result(spec: AttackSpec, correct: list[bool], targets_sha: str = "") -> AttackResult:
    c = np.array(correct, dtype=bool)
    return AttackResult(spec, c, ~c, None, passes=0, seconds=0.0, targets_sha256=targets_sha)


def test_mcnemar_pairs_from_outcome_files(tmp_path):
    root = tmp_path / "runs"
    a = [True] * 5 + [False] * 15
    b = [True] * 15 + [False] * 5  # b is right on 10 examples a gets wrong, never the reverse
    for arch, correct, targets in (("resnet26", a, "t1"), ("lrnet26", b, "t2")):
        run = root / f"{arch}-adv"
        rows = []
        for spec, sha in ((AttackSpec("clean"), ""), (AttackSpec("pgd-targeted"), targets)):
            result = _result(spec, correct, sha)
            name = f"outcomes/{spec.name}.npz"
            meta = {"arch": arch, "train_mode": "adversarial", "dataset": "digits",
                    "split": "test", "subset_sha256": "subset-x"}  # fmt: skip
            save_outcomes(run / name, result, result.row(meta))
            rows.append(result.row(meta) | {"outcomes_file": name})
        pd.DataFrame(rows).to_csv(run / "eval.csv", index=False)
    table = build_table9(collect_results(runs_dir=root))
    pairs = seed_pair_table(table).set_index("cell")
    clean = pairs.loc["adv_clean"]
    assert (clean["network_a"], clean["network_b"]) == ("lrnet26", "resnet26")  # LR-Net - ResNet
    assert (clean["only_a"], clean["only_b"], clean["n"]) == (10, 0, 20)
    assert clean["p_value"] == pytest.approx(2 / 2**10)
    assert bool(clean["significant"]) and clean["difference"] == 50.0
    targeted = pairs.loc["adv_targeted"]
    assert pd.isna(targeted["p_value"]) and "different targets" in targeted["note"]
    compared = pair_table(table).set_index("cell")
    assert compared.loc["adv_clean", "verdict"] == "lrnet26 higher"
    assert compared.loc["adv_clean", "difference_low"] > 0
    assert "lrnet26 higher: +50.0 [" in compared.loc["adv_clean", "sentence"]
    assert (
        "not tested (not paired: attacked toward different targets)"
        in (compared.loc["adv_targeted", "sentence"])
    )


@pytest.mark.slow
def test_result_plots_written(runs, tmp_path):
    results = collect_results(runs_dir=runs)
    sweep = results[results["run"] == "resnet26-adv"].iloc[[2]].copy()
    sweep["eps"] = 32 / 255
    sweep["accuracy"], sweep["accuracy_low"], sweep["accuracy_high"] = 2.0, 1.0, 3.0
    written = report_plots(pd.concat([results, sweep]), tmp_path / "plots", EPS)
    names = {p.name for p in written}
    assert {"accuracy_vs_eps.png", "accuracy_vs_steps.png", "accuracy_vs_eps_targeted.png"} <= names
    for path in written:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 1024


@pytest.mark.slow
def test_image_grid_and_geo_priors(tmp_path):
    x = torch.rand(4, 3, 16, 16)
    x_adv = (x + 0.05 * torch.randn_like(x).sign()).clamp(0, 1)
    grid = plot_image_grid(x, x_adv, tmp_path / "grid.png")
    assert grid.read_bytes()[:8] == PNG and grid.stat().st_size > 1024
    with pytest.raises(ValueError):
        plot_image_grid(x, x_adv[:2], tmp_path / "bad.png")
    model = create_model("lrnet26", num_classes=10, small_input=True, width=0.25)
    maps = geo_prior_maps(model)
    assert list(maps) == ["res1 (stem)", "res2", "res3", "res4", "res5"]
    for prior in maps.values():
        assert prior.shape == (7, 7) and prior.sum().item() == pytest.approx(1.0, abs=1e-5)
    path = plot_geo_priors(model, tmp_path / "geo.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1024
    with pytest.raises(ValueError, match="no local relation"):
        plot_geo_priors(create_model("resnet26", num_classes=10, width=0.25), tmp_path / "r.png")


def test_determinism_check_fails_in_train_mode_bn():
    class TrainBN(torch.nn.Module):
        """BN that always uses batch statistics: eval-mode logits depend on the batch."""

        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3 * 4 * 4, track_running_stats=False)
            self.fc = torch.nn.Linear(3 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(x.flatten(1)))

    x = torch.rand(8, 3, 4, 4)
    assert check_determinism(TrainBN(), x).status == "fail"
    good = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    assert check_determinism(good, x).status == "pass"


@pytest.mark.slow
def test_cli_report(runs, tmp_path):
    out = tmp_path / "rep" / "table9.csv"
    result = CliRunner(env={"COLUMNS": "220"}).invoke(
        report, ["--runs", str(runs), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "resnet26" in result.output and "regular_near_zero" in result.output
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert (out.parent / "checks.csv").is_file()
    assert (out.parent / "plots" / "accuracy_vs_steps.png").is_file()
    latex = tmp_path / "t.tex"
    result = CliRunner().invoke(
        report, ["--runs", str(runs), "--out", str(latex), "--format", "latex", "--no-plots"]
    )
    assert result.exit_code == 0, result.output
    assert latex.read_text().startswith(r"\begin{table}")


def _one_error_line(output: str, message: str) -> bool:
    lines = output.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_cli_report_bad_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(report, ["--runs", str(empty)])
    assert result.exit_code == 2 and _one_error_line(result.output, "no eval.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("just,some\nthing,else\n")
    result = CliRunner().invoke(report, [str(bad)])
    assert result.exit_code == 2 and _one_error_line(result.output, "not an eval.csv")
    with pytest.raises(ResultsError, match="does not exist"):
        collect_results([tmp_path / "missing.csv"])
    result = CliRunner().invoke(report, ["--runs", str(empty), "--eps", "2"])
    assert result.exit_code == 2 and "outside [0, 1]" in result.output


def _checkpoint(tmp_path: Path, arch: str, **options: object) -> Path:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, **options)
    payload = {
        "model": model.state_dict(),
        "arch": arch,
        "model_options": options,
        "num_classes": 10,
        "epoch": 0,
        "config": {"dataset": "digits", "mode": "regular"},
    }
    return save_checkpoint(payload, tmp_path / arch / "best.pt")


@pytest.mark.slow
def test_cli_viz_geo_prior(tmp_path):
    ckpt = _checkpoint(tmp_path, "lrnet26", small_input=True, width=0.25)
    out = tmp_path / "geo.png"
    result = CliRunner().invoke(viz, ["geo-prior", "--checkpoint", str(ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG
    result = CliRunner().invoke(viz, ["geo-prior", "--checkpoint", str(tmp_path / "none.pt")])
    assert result.exit_code == 2 and _one_error_line(result.output, "does not exist")


@pytest.mark.slow
def test_cli_check_runs_live_checks(tmp_path):
    ckpt = _checkpoint(tmp_path, "resnet26", small_input=True, width=0.125)
    out = tmp_path / "check"
    result = CliRunner(env={"COLUMNS": "220"}).invoke(
        check,
        ["--checkpoint", str(ckpt), "--limit", "6", "--steps", "1,2", "--no-bf16",
         "--out", str(out)],
    )  # fmt: skip
    checks = pd.read_csv(out / "checks.csv")
    # exit code 1 exactly when a check fails (an untrained model may fail one)
    assert result.exit_code == int((checks["status"] == "fail").any()), result.output
    assert "eval_determinism" in result.output
    assert checks.loc[checks["check"] == "eval_determinism", "status"].item() == "pass"
    assert {"more_steps", "eps_sweep", "zero_gradients"} <= set(checks["check"])
    rows = pd.read_csv(out / "check_eval.csv")
    assert set(rows["steps"]) >= {1, 2} and rows["arch"].eq("resnet26").all()
    assert (out / "adversarial_examples.png").stat().st_size > 1024
