"""``robustlr eval --model SPEC``: TorchScript, torch.export, ``module:factory`` and timm models
through the checkpoints' evaluation path, their run records, reports, RobustBench-style JSON
(validated against docs/external-models.md) and bad SPECs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CLI, FAST, REPO, cli_env, invoke_cli, row, write_run

from robustlr.checkpoint import read_checkpoint
from robustlr.eval.external import ExternalOptions, open_external
from robustlr.report.robustbench import FIELDS, RESULT_FIELDS, ROBUSTLR_FIELDS, validate
from robustlr.runs import EXTERNAL_RECORD

TRAIN = [*FAST, "--epochs", "1", "--set", "max_steps_per_epoch=4", "--batch-size", "32"]
ATTACKS = ["--attack", "pgd-targeted", "--attack", "pgd-untargeted", "--steps", "3"]
SAME = ["n", "subset_sha256", "attack", "eps", "steps", "target_policy", "targets_sha256",
        "accuracy", "accuracy_low", "accuracy_high", "target_success", "passes"]  # fmt: skip
DOC = REPO / "docs" / "external-models.md"

# a module with factories, written into the test's working directory
FACTORIES = """
import torch
from torch import nn


def make(width=4, classes=10, channels=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * width, classes),
    )


def broken(**kwargs):
    raise RuntimeError("factory exploded")


def not_a_module():
    return 42
"""


def _one_error(result, fragment: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0], lines[0]


def _rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained robustlr resnet26, its TorchScript and torch.export copies."""
    cwd = tmp_path_factory.mktemp("external")
    out = invoke_cli("train", *TRAIN, "--out", "runs/res", cwd=cwd)
    assert out.exit_code == 0, out.output
    model = read_checkpoint(cwd / "runs/res/best.pt").build_model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.script(model), cwd / "scripted.pt")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(4, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, cwd / "exported.pt2")
    (cwd / "factories.py").write_text(FACTORIES)
    return cwd


def _assert_same_rows_and_outcomes(cwd: Path, a: Path, b: Path) -> None:
    rows_a, rows_b = _rows(a), _rows(b)
    pd.testing.assert_frame_equal(rows_a[SAME], rows_b[SAME])
    assert (rows_a["checkpoint_sha256"] != rows_b["checkpoint_sha256"]).all()
    for file_a, file_b in zip(rows_a["outcomes_file"], rows_b["outcomes_file"], strict=True):
        out_a, out_b = np.load(a.parent / file_a), np.load(b.parent / file_b)
        for key in ("correct", "success", "targets"):
            assert np.array_equal(out_a[key], out_b[key]), key


def _eval_all(cwd: Path, args: list[str]) -> None:
    """``robustlr eval --checkpoint`` and ``--model FILE --dataset digits`` for both copies."""
    for source in (["--checkpoint", "runs/res"],
                   ["--model", "scripted.pt", "--dataset", "digits"],
                   ["--model", "exported.pt2", "--dataset", "digits"]):  # fmt: skip
        out = invoke_cli("eval", *source, *args, cwd=cwd)
        assert out.exit_code == 0, out.output


@pytest.mark.slow
def test_scripted_and_exported_copies_give_the_checkpoints_rows(exported):
    _eval_all(exported, [*ATTACKS, "--limit", "20"])
    ckpt = exported / "runs/res/eval.csv"
    rows = _rows(ckpt)
    assert 0 < rows.loc[rows["attack"] == "clean", "accuracy"].item() < 100  # not degenerate
    for name in ("scripted", "exported"):
        csv = exported / "runs" / name / "eval.csv"
        _assert_same_rows_and_outcomes(exported, ckpt, csv)
        record = json.loads((exported / "runs" / name / EXTERNAL_RECORD).read_text())
        model_file = exported / f"{name}.{'pt' if name == 'scripted' else 'pt2'}"
        digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
        assert record["files"]["model"]["sha256"] == digest
        assert record["kind"] == {"scripted": "torchscript", "exported": "export"}[name]
        ext = _rows(csv)
        assert (ext["checkpoint_sha256"] == record["model_sha256"]).all()
        assert (ext["arch"] == name).all() and (ext["train_mode"] == "regular").all()
        assert (ext["dataset"] == "digits").all()


@pytest.mark.slow
def test_digits_suite_on_scripted_and_exported_copies_bit_for_bit(exported, tmp_path):
    cwd = tmp_path
    for name in ("runs", "scripted.pt", "exported.pt2"):
        (shutil.copytree if name == "runs" else shutil.copy)(exported / name, cwd / name)
    for d in ("scripted", "exported"):
        shutil.rmtree(cwd / "runs" / d, ignore_errors=True)
    (cwd / "runs/res/eval.csv").unlink(missing_ok=True)
    shutil.rmtree(cwd / "runs/res/outcomes", ignore_errors=True)
    _eval_all(cwd, ["--suite", "digits", "--limit", "64"])
    for name in ("scripted", "exported"):
        _assert_same_rows_and_outcomes(
            cwd, cwd / "runs/res/eval.csv", cwd / "runs" / name / "eval.csv"
        )


@pytest.mark.slow
def test_external_model_under_torchrun_equals_one_process(exported):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    args = ["eval", "--model", "exported.pt2", "--name", "sharded", "--limit", "21",
            "--batch-size", "4", "--attack", "pgd-targeted", "--steps", "2"]  # fmt: skip
    one = invoke_cli(*args, "--out", "one.csv", cwd=exported)
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", CLI, *args, "--out", "two.csv",
         "--save-examples", "two-outcomes"],
        cwd=exported, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(exported / "one.csv"), _rows(exported / "two.csv")
    pd.testing.assert_frame_equal(a[SAME], b[SAME])
    correct_a = np.load(exported / a.loc[1, "outcomes_file"])["correct"]
    correct_b = np.load(exported / b.loc[1, "outcomes_file"])["correct"]
    assert np.array_equal(correct_a, correct_b)


@pytest.mark.slow
def test_timm_model_appears_in_the_report_paired_with_lrnet(tmp_path):
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    lrnet = [*TRAIN, "--arch", "lrnet26", "--set", "max_steps_per_epoch=1"]
    out = invoke_cli("train", *lrnet, "--out", "runs/lr", cwd=tmp_path)
    assert out.exit_code == 0, out.output
    common = ["--attack", "pgd-untargeted", "--steps", "1", "--limit", "24"]
    out = invoke_cli("eval", "--checkpoint", "runs/lr", *common, cwd=tmp_path)
    assert out.exit_code == 0, out.output
    out = invoke_cli(
        "eval", "--model", "timm:resnet18", "--weights", "w.pt", "--dataset", "digits",
        "--model-arg", "num_classes=10", "--model-arg", "in_chans=1", "--grayscale",
        "--mean", "0.5", "--std", "0.5", *common, cwd=tmp_path,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    record = json.loads((tmp_path / "runs/timm-resnet18" / EXTERNAL_RECORD).read_text())
    assert record["model_args"] == {"num_classes": 10, "in_chans": 1} and record["grayscale"]
    assert (
        record["files"]["weights"]["sha256"]
        == hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    )
    out = invoke_cli("report", "--no-plots", "--format", "robustbench", cwd=tmp_path)
    assert out.exit_code == 0, out.output
    table = pd.read_csv(tmp_path / "runs/table9.csv")
    assert {"lrnet26", "timm-resnet18"} <= set(table["network"])
    pairs = pd.read_csv(tmp_path / "runs/pairs.csv")
    wanted = {"lrnet26", "timm-resnet18"}
    pair = pairs[
        [{a, b} == wanted for a, b in zip(pairs["network_a"], pairs["network_b"], strict=True)]
    ]
    assert len(pair) == 1 and pair["p_value"].notna().all(), pairs
    infos = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs/robustbench").iterdir()}
    assert set(infos) == {"lr", "timm-resnet18"}
    spec = _doc_fields()
    for info in infos.values():
        assert _doc_problems(info, spec) == [], info
        assert "autoattack_acc" not in info  # no autoattack row: absent, not guessed
    assert (
        infos["lr"]["additional_data"] is False and "additional_data" not in infos["timm-resnet18"]
    )
    assert infos["timm-resnet18"]["robustlr"]["external"] is True
    assert infos["timm-resnet18"]["robustlr"]["checkpoint_sha256"] == record["model_sha256"]


def test_factory_with_args_and_weights_is_recorded(tmp_path):
    (tmp_path / "factories.py").write_text(FACTORIES)
    sys.path.insert(0, str(tmp_path))
    try:
        import factories
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("factories", None)
    torch.save(factories.make(width=6).state_dict(), tmp_path / "w6.pt")
    out = invoke_cli("eval", "--model", "factories:make", "--model-arg", "width=6",
                     "--weights", "w6.pt", "--attack", "clean", "--limit", "8",
                     "--name", "tiny", cwd=tmp_path)  # fmt: skip
    assert out.exit_code == 0, out.output
    record = json.loads((tmp_path / "runs/tiny" / EXTERNAL_RECORD).read_text())
    assert record["kind"] == "factory" and record["model_args"] == {"width": 6}
    assert set(record["files"]) == {"weights"}
    rows = _rows(tmp_path / "runs/tiny/eval.csv")
    assert rows["checkpoint_sha256"].tolist() == [record["model_sha256"]]
    # the same model again appends; the same name with other normalisation is refused
    again = invoke_cli("eval", "--model", "factories:make", "--model-arg", "width=6",
                       "--weights", "w6.pt", "--attack", "clean", "--limit", "8",
                       "--name", "tiny", cwd=tmp_path)  # fmt: skip
    assert again.exit_code == 0 and len(_rows(tmp_path / "runs/tiny/eval.csv")) == 2
    other = invoke_cli("eval", "--model", "factories:make", "--model-arg", "width=6",
                       "--weights", "w6.pt", "--mean", "0.5", "--std", "0.5", "--attack",
                       "clean", "--limit", "8", "--name", "tiny", cwd=tmp_path)  # fmt: skip
    _one_error(other, "holds another model")


def test_mean_std_wrap_the_model_in_the_normaliser(tmp_path, monkeypatch):
    (tmp_path / "factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    plain = open_external(
        ExternalOptions("factories:make"), tmp_path / "runs", torch.device("cpu"), write=False
    )
    wrapped = open_external(
        ExternalOptions("factories:make", mean=(0.5,), std=(0.25, 0.5, 1.0)),
        tmp_path / "runs",
        torch.device("cpu"),
        write=False,
    )
    x = torch.rand(5, 3, 16, 16)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(wrapped.model(x), plain.model((x - mean) / std))
        assert not torch.equal(wrapped.model(x), plain.model(x))
    assert wrapped.record.mean == [0.5] * 3 and wrapped.record.std == [0.25, 0.5, 1.0]
    assert wrapped.meta["checkpoint_sha256"] != plain.meta["checkpoint_sha256"]
    sys.modules.pop("factories", None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "junk.pt"], "neither a TorchScript file"),
        (["--model", "state.pt"], "neither a TorchScript file"),
        (["--model", "factories:broken"], "raised RuntimeError: factory exploded"),
        (["--model", "factories:not_a_module"], "returned int, not an nn.Module"),
        (["--model", "no_such_module:make"], "cannot import no_such_module"),
        (["--model", "factories:nothing"], "factories has no nothing"),
        (["--model", "not a spec"], "neither timm:NAME nor package.module:factory"),
        (["--model", "factories:make", "--model-arg", "classes=7"], "outputs 7 classes; digits"),
        (["--model", "factories:make", "--model-arg", "channels=1"], "the model fails on digits"),
        (["--model", "factories:make", "--weights", "state.pt"], "does not fit the model"),
        (["--model", "factories:make", "--mean", "0.5,0.5", "--std", "1"], "--mean has 2 values"),
        (["--model", "factories:make", "--mean", "0.5"], "give both --mean and --std"),
        (["--model", "factories:make", "--model-arg", "width"], "--model-arg expects KEY=VALUE"),
        (["--model", "factories:make", "--name", "resnet26"], "not a robustlr architecture"),
        (["--model", "factories:make", "--checkpoint", "x.pt"], "not both"),
        (["--model", "factories:make", "--allow-other-data"], "--allow-other-data is for"),
        (["--dataset", "digits", "--checkpoint", "x.pt"], "--dataset describe(s) a --model"),
        (["--model", "timm:resnet18", "--grayscale", "--model-arg", "in_chans=1"], "outputs 1000"),
    ],
)
def test_bad_specs_are_one_line_exit_2(tmp_path, args, message):
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")
    if "timm:resnet18" in args:
        pytest.importorskip("timm")
    result = invoke_cli("eval", *args, "--attack", "clean", "--limit", "4", cwd=tmp_path)
    sys.modules.pop("factories", None)
    _one_error(result, message)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("eval.csv"))


def test_dataset_mismatch_with_the_runs_record_is_refused(tmp_path):
    (tmp_path / "factories.py").write_text(FACTORIES)
    args = ["eval", "--model", "factories:make", "--attack", "clean", "--limit", "4"]
    assert invoke_cli(*args, cwd=tmp_path).exit_code == 0
    other = invoke_cli(*args, "--image-size", "20", cwd=tmp_path)
    sys.modules.pop("factories", None)
    _one_error(other, "evaluated this model on image_size 16, not 20")


@pytest.mark.slow
def test_check_takes_an_external_model(exported):
    out = invoke_cli("check", "--model", "scripted.pt", "--limit", "6", "--steps", "1,2",
                     "--no-bf16", "--out", "check", cwd=exported)  # fmt: skip
    checks = pd.read_csv(exported / "check/checks.csv")
    assert out.exit_code == int((checks["status"] == "fail").any()), out.output
    assert "scripted on 6 digits test images" in out.output
    assert checks.loc[checks["check"] == "eval_determinism", "status"].item() == "pass"
    assert (pd.read_csv(exported / "check/check_eval.csv")["arch"] == "scripted").all()
    assert not (exported / "runs/scripted/check").exists()


# --- RobustBench-style JSON against the documented field list ---


def _doc_fields() -> dict[str, dict[str, tuple[str, bool]]]:
    """The field tables of docs/external-models.md: section -> field -> (type, required)."""
    sections: dict[str, dict[str, tuple[str, bool]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
            sections[current] = {}
        elif current and re.match(r"^\| [a-z_0-9]+ \|", line):
            name, kind, required = [c.strip() for c in line.strip("|").split("|")][:3]
            if name != "field":  # the header
                sections[current][name] = (kind, required == "yes")
    return sections


def _doc_problems(info: dict, spec: dict) -> list[str]:
    """Validate a model-info dict against the docs' tables (independently of the module)."""
    types = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict}
    top, ours, result = (spec[k] for k in spec)  # the docs' three tables, in order

    def check(obj: dict, fields: dict, where: str) -> list[str]:
        out = [f"{where}{k} undocumented" for k in obj if k not in fields]
        for name, (kind, required) in fields.items():
            if name not in obj:
                out += [f"{where}{name} missing"] if required else []
            elif isinstance(obj[name], bool) != (kind == "boolean") or not isinstance(
                obj[name], types[kind]
            ):
                out.append(f"{where}{name} not {kind}")
        return out

    problems = check(info, top, "")
    if isinstance(info.get("robustlr"), dict):
        problems += check(info["robustlr"], ours, "robustlr.")
        for part in ("clean", "autoattack"):
            if isinstance(info["robustlr"].get(part), dict):
                problems += check(info["robustlr"][part], result, f"robustlr.{part}.")
    return problems


def test_documented_fields_are_the_writers_fields():
    spec = list(_doc_fields().values())
    assert len(spec) == 3
    for documented, declared in zip(spec, (FIELDS, ROBUSTLR_FIELDS, RESULT_FIELDS), strict=True):
        assert documented == {k: (v[0], v[1]) for k, v in declared.items()}


def _report(runs: Path, *extra: str):
    return invoke_cli("report", "--runs", str(runs), "--no-plots", "--format", "robustbench",
                      *extra, cwd=runs.parent)  # fmt: skip


STANDARD = "version=standard"  # any recorded settings mark a row as the standard ensemble's


def test_autoattack_acc_only_from_a_standard_autoattack_row_at_the_eps(tmp_path):
    runs = tmp_path / "runs"
    clean = row("clean", 80.0, n=200)
    write_run(runs, "std", "resnet26", "adversarial", [
        row("clean", 90.0), row("pgd-targeted", 50.0), clean,
        row("autoattack", 31.5, n=200, attack_settings=STANDARD),
        row("autoattack", 10.0, n=200, eps=8 / 255, attack_settings=STANDARD),  # another eps
    ])  # fmt: skip
    write_run(runs, "fast", "lrnet26", "adversarial", [
        row("clean", 88.0), row("pgd-targeted", 55.0),
        row("autoattack-fast", 40.0, n=200),  # the reduced ensemble is not AutoAttack
        row("autoattack", 20.0, n=200, precision="bf16", attack_settings=STANDARD),
        row("autoattack", 21.0, n=200),  # written before settings were recorded: the fast one
    ])  # fmt: skip
    out = _report(runs)
    assert out.exit_code == 0, out.output
    std = json.loads((runs / "robustbench/std.json").read_text())
    fast = json.loads((runs / "robustbench/fast.json").read_text())
    spec = _doc_fields()
    assert _doc_problems(std, spec) == [] and _doc_problems(fast, spec) == []
    assert validate(std) == [] and validate(fast) == []
    assert std["autoattack_acc"] == "31.50" and std["eps"] == "16/255"
    assert std["clean_acc"] == "80.00"  # the clean row on the autoattack row's images
    assert std["robustlr"]["autoattack"]["n"] == std["robustlr"]["clean"]["n"] == 200
    low, high = (
        std["robustlr"]["autoattack"]["accuracy_low"],
        std["robustlr"]["autoattack"]["accuracy_high"],
    )
    assert low < 31.5 < high
    assert "autoattack_acc" not in fast and "autoattack" not in fast["robustlr"]
    assert fast["clean_acc"] == "88.00" and fast["additional_data"] is False
    # a broken file is caught by both validators
    broken = {k: v for k, v in std.items() if k != "clean_acc"} | {"number_forward_passes": "1"}
    assert len(_doc_problems(broken, spec)) == 2 and len(validate(broken)) == 2
