"""The main job end to end through the CLI: advtrain -> eval -> report, and eval's bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CLI, FAST, cli_env, invoke_cli, run_cli

TINY = [*FAST, "--epochs", "1", "--set", "max_steps_per_epoch=2", "--batch-size", "16"]


@pytest.fixture(scope="module")
def adv_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pipeline")
    out = invoke_cli("advtrain", *TINY, "--steps", "2", "--out", "runs/adv", cwd=cwd)
    assert out.exit_code == 0, out.output
    return cwd


def test_advtrain_records_threat_model_and_adversarial_metrics(adv_run):
    config = json.loads((adv_run / "runs/adv/config.json").read_text())
    assert config["mode"] == "adversarial"
    adv = config["adversarial"]
    assert adv["steps"] == 2 and adv["target"] == "random" and adv["mix"] == 0.5
    assert adv["eps"] == pytest.approx(16 / 255) and adv["step_size"] == pytest.approx(2 / 255)
    metrics = pd.read_csv(adv_run / "runs/adv/metrics.csv")
    assert {"clean_acc", "adv_acc", "attack_success"} <= set(metrics.columns)
    assert metrics["attack_success"].between(0, 1).all()


@pytest.mark.slow
def test_eval_appends_rows_with_threat_model_then_report(adv_run):
    args = ["eval", "--checkpoint", "runs/adv/best.pt", "--limit", "24", "--batch-size", "12"]
    first = invoke_cli(*args, "--attack", "clean", "--attack", "pgd-targeted", "--steps", "2",
                       cwd=adv_run)  # fmt: skip
    assert first.exit_code == 0, first.output
    second = invoke_cli(*args, "--attack", "pgd-untargeted", "--attack", "apgd-ce", "--steps", "2",
                        cwd=adv_run)  # fmt: skip
    assert second.exit_code == 0, second.output
    rows = pd.read_csv(adv_run / "runs/adv/eval.csv", keep_default_na=False)
    # appended, never rewritten; every evaluation reports the clean accuracy too
    attacks = ["clean", "pgd-targeted", "clean", "pgd-untargeted", "apgd-ce"]
    assert list(rows["attack"]) == attacks
    apgd = rows.iloc[4]
    assert apgd["step_size"] == "" and apgd["attack_settings"].startswith("APGD(steps=2,")
    targeted = rows.iloc[1]
    assert targeted["target_policy"] == "random" and len(targeted["targets_sha256"]) == 64
    assert targeted["n"] == 24 and targeted["passes"] == 2 * 24
    assert targeted["train_mode"] == "adversarial" and targeted["arch"] == "resnet26"
    assert targeted["eps"] == pytest.approx(16 / 255) and targeted["steps"] == 2
    assert (
        float(targeted["accuracy_low"]) <= targeted["accuracy"] <= float(targeted["accuracy_high"])
    )
    assert len(list((adv_run / "runs/adv/targets").glob("targets-0-*.npy"))) == 1
    assert all((adv_run / "runs/adv" / f).is_file() for f in rows["outcomes_file"])

    report = invoke_cli("report", "--runs", "runs", "--no-plots", cwd=adv_run)
    assert report.exit_code == 0, report.output
    table = pd.read_csv(adv_run / "runs/table9.csv")
    assert list(table.columns[:5]) == [
        "network", "adv_clean", "adv_targeted", "adv_untargeted", "regular_clean"
    ]  # fmt: skip
    assert table.loc[0, "network"] == "resnet26" and pd.isna(table.loc[0, "regular_clean"])
    assert table.loc[0, "adv_apgd_ce"] == pytest.approx(apgd["accuracy"], abs=0.05)
    checks = pd.read_csv(adv_run / "runs/checks.csv", keep_default_na=False)
    optimism = checks[checks["check"] == "pgd_not_optimistic"]
    assert list(optimism["status"]) in (["pass"], ["warn"]), optimism  # judged, not skipped
    assert "## Stronger attacks beside Table 9" in (adv_run / "runs/table9.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "pgd-targeted", "--eps", "2"], "outside [0, 1]"),
        (["--attack", "deepfool"], "deepfool"),
        (["--attack", "clean", "--checkpoint", "missing.pt"], "does not exist"),
        (["--attack", "clean", "--runs", "nowhere"], "no runs found"),
        (["--suite", "nonexistent"], "no attack suite"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(tmp_path, args, message):
    out = invoke_cli("eval", *args, cwd=tmp_path)
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and message in out.output


@pytest.mark.slow
def test_eval_refuses_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = run_cli("eval", "--attack", "clean", "--checkpoint", "bad.pt", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "corrupt" in out.stderr
    assert out.stderr.startswith("Error: ") and out.stderr.count("\n") == 1


@pytest.mark.slow
def test_eval_under_torchrun_equals_one_process(adv_run):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    args = ["eval", "--checkpoint", "runs/adv/best.pt", "--limit", "21", "--batch-size", "4",
            "--attack", "clean", "--attack", "pgd-targeted", "--steps", "2"]  # fmt: skip
    one = invoke_cli(*args, "--out", "one.csv", cwd=adv_run)
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", CLI, *args, "--out", "two.csv",
         "--save-examples", "two-outcomes"],
        cwd=adv_run, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stdout
    a = pd.read_csv(adv_run / "one.csv", keep_default_na=False)
    b = pd.read_csv(adv_run / "two.csv", keep_default_na=False)
    same = [
        "n",
        "attack",
        "accuracy",
        "target_success",
        "targets_sha256",
        "passes",
        "subset_sha256",
    ]
    pd.testing.assert_frame_equal(a[same], b[same])
    outcome_a = np.load(adv_run / a.loc[1, "outcomes_file"])
    outcome_b = np.load(adv_run / b.loc[1, "outcomes_file"])
    assert a.loc[1, "outcomes_file"] != b.loc[1, "outcomes_file"]  # two files, not one twice
    assert np.array_equal(outcome_a["correct"], outcome_b["correct"])
