"""``robustlr run``: a whole study from a recipe, stages skipped when complete, resumed when not."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import invoke_cli, run_cli

from robustlr.study import RecipeError, load_recipe, plan_stages, study_status

TINY = """
name = "tiny"
description = "test study"
[data]
dataset = "digits"
image_size = 16
[train]
epochs = 1
max_steps_per_epoch = 2
batch_size = 32
width = 0.25
small_input = true
seed = 1
[adversarial]
steps = 2
step_size = "8/255"
[[network]]
arch = "resnet26"
[eval]
limit = 16
batch_size = 16
[[eval.attack]]
name = "clean"
[[eval.attack]]
name = "pgd-targeted"
eps = "16/255"
step_size = "8/255"
steps = 2
[[eval.attack]]
name = "pgd-untargeted"
eps = "16/255"
step_size = "8/255"
steps = 2
"""
STAGES = [
    "train resnet26-regular-s1",
    "advtrain resnet26-adversarial-s1",
    "eval resnet26-regular-s1",
    "eval resnet26-adversarial-s1",
    "report",
]


def _recipe(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _stage_states(tmp_path: Path, *overrides: str) -> dict[str, str]:
    """{stage name: status} of the study, as ``robustlr run --dry-run`` lists them."""
    recipe = load_recipe(tmp_path / "tiny.toml", overrides)
    return {stage.name: status.state for stage, status in study_status(recipe, tmp_path / "study")}


def _run(tmp_path: Path, *args: str) -> str:
    proc = run_cli("run", str(tmp_path / "tiny.toml"), "--out", "study", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow  # a whole study, five subprocess runs
def test_study_runs_skips_completed_stages_and_resumes(tmp_path: Path) -> None:
    _recipe(tmp_path)
    study = tmp_path / "study"
    dry = _run(tmp_path, "--dry-run")
    assert "report" in dry and dry.count("pending") == len(STAGES)  # (long names wrap)
    assert _stage_states(tmp_path) == dict.fromkeys(STAGES, "pending")
    assert not study.exists()

    # stop after the first eval, then leave rows of a killed eval of the adversarial run
    out = _run(tmp_path, "--until", "eval resnet26-regular-s1")
    assert f"ran: {', '.join(STAGES[:3])}" in out
    regular, adversarial = study / "resnet26-regular-s1", study / "resnet26-adversarial-s1"
    assert len(_rows(regular / "eval.csv")) == 3
    assert not (adversarial / "eval.csv").exists() and not (study / "table9.csv").exists()
    (adversarial / "eval.partial.csv").write_text((regular / "eval.csv").read_text())

    out = _run(tmp_path)
    assert "ran: eval resnet26-adversarial-s1, report" in out
    assert not (adversarial / "eval.partial.csv").exists()
    for run in (regular, adversarial):
        rows = _rows(run / "eval.csv")
        assert [r["attack"] for r in rows] == ["clean", "pgd-targeted", "pgd-untargeted"]
        assert {r["run"] for r in rows} == {run.name}
    table = _rows(study / "table9.csv")
    assert [r["network"] for r in table] == ["resnet26"]
    assert table[0]["adv_clean"] != "" and table[0]["regular_clean"] != ""
    assert "| resnet26 |" in (study / "table9.md").read_text()
    assert list((study / "plots").glob("*.png"))

    # a second invocation has nothing to do and duplicates nothing
    before = {p: p.read_bytes() for p in study.rglob("eval.csv")}
    assert _stage_states(tmp_path) == dict.fromkeys(STAGES, "done")
    assert "ran: nothing" in _run(tmp_path)
    assert {p: p.read_bytes() for p in study.rglob("eval.csv")} == before

    # other training settings are not these models': refused, nothing touched
    states = _stage_states(tmp_path, "train.epochs=2")
    assert states[STAGES[0]] == states[STAGES[1]] == "conflict"
    proc = run_cli("run", "tiny.toml", "--out", "study", "--set", "train.epochs=2", cwd=tmp_path)
    assert proc.returncode == 2 and "train.epochs was 1, now 2" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in study.rglob("eval.csv")} == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("[[network]]\narch", "[[netwrk]]\narch"), "unknown key(s) netwrk"),
        (lambda t: t.replace('arch = "resnet26"', ""), "needs arch"),
        (lambda t: t.split("[[network]]")[0], "no networks"),
        (lambda t: t.replace("epochs = 1", "epochz = 1"), "unknown key(s) epochz"),
        (lambda t: t.replace("epochs = 1", 'epochs = "one"'), "epochs"),
        (lambda t: t.replace("steps = 2\nstep_size", "stepz = 2\nstep_size"), "stepz"),
        (lambda t: t.replace("limit = 16", 'suite = "digits"\nlimit = 16'), "either suite"),
        (lambda t: t.replace('arch = "resnet26"', 'arch = "resnet9"'), "unknown arch"),
        (lambda t: t + '[[network]]\narch = "resnet26"\n', "listed twice"),
        (lambda t: t + "[eval", "not valid TOML"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path: Path, edit, message: str) -> None:
    path = _recipe(tmp_path, edit(TINY))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_bad_recipe_exits_2(tmp_path: Path) -> None:
    _recipe(tmp_path, TINY.replace("[[network]]", "[[netwrk]]"))
    proc = run_cli("run", "tiny.toml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    result = invoke_cli("run", "no-such-recipe", cwd=tmp_path)
    assert result.exit_code == 2 and "no recipe 'no-such-recipe'" in result.output


@pytest.mark.slow
def test_overrides_and_shipped_recipes(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path), ["train.epochs=3", "data.path='/x'", "eval.limit=4"])
    config = recipe.train_config(recipe.networks[0], "adversarial", tmp_path / "r")
    assert (config.epochs, config.data, recipe.eval.limit) == (3, "/x", 4)
    assert config.adversarial["steps"] == 2 and config.adversarial["step_size"] == 8 / 255
    with pytest.raises(RecipeError, match=r"section\.key=value"):
        load_recipe(tmp_path / "tiny.toml", ["epochs"])
    for name in ("table9-digits", "table9-cifar10", "table9-imagenet"):
        shipped = load_recipe(name)
        assert shipped.name == name
        assert [s.kind for s in plan_stages(shipped)][-1] == "report"
    imagenet = load_recipe("table9-imagenet")
    config = imagenet.train_config(imagenet.networks[0], "adversarial", tmp_path / "r")
    assert (config.image_size, config.epochs, config.batch_size, config.lr) == (224, 110, 1024, 0.4)
    assert (config.schedule, config.milestones, config.warmup_epochs) == ("step", [30, 60, 90], 5)
    assert config.adversarial["steps"] == 16 and config.adversarial["eps"] == 16 / 255
