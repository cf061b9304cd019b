"""A study's seeds and the identity of its stages: every run keyed by the settings that decide
its result, a changed setting never reused, a folder kept to its recipe (no training here:
checkpoints are written directly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import invoke_cli

from robustlr.checkpoint import Checkpoint, save_checkpoint
from robustlr.eval.session import file_sha256
from robustlr.study import RecipeError, load_recipe, plan_stages, study_status
from robustlr.study.stages import (
    CONFLICT,
    DONE,
    EVAL_KEY,
    PENDING,
    STUDY_MARKER,
    StudyError,
    eval_key,
    resolve_stage,
    stage_status,
    stage_train_config,
    train_key,
    write_json,
)

SEEDED = """
name = "seeded"
seeds = [0, 1, 2]
[data]
dataset = "digits"
image_size = 16
[train]
epochs = 2
batch_size = 32
width = 0.25
small_input = true
[adversarial]
steps = 2
step_size = "8/255"
[[network]]
arch = "resnet26"
[[network]]
arch = "lrnet26"
modes = ["regular"]
seeds = [5]
[eval]
limit = 16
[[eval.attack]]
name = "clean"
[[eval.attack]]
name = "pgd-untargeted"
eps = "16/255"
steps = 2
"""


def _recipe(tmp_path: Path, text: str = SEEDED, name: str = "seeded.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _statuses(recipe_file: Path, out: Path, *overrides: str) -> dict[str, tuple[str, str]]:
    recipe = load_recipe(recipe_file, overrides)
    return {s.name: (st.state, st.detail) for s, st in study_status(recipe, out)}


def _fake_training(recipe_file: Path, out: Path, stage_name: str, *overrides: str, epoch=None):
    """checkpoint.pt of the stage's run as its training would leave it (weights left empty)."""
    recipe = load_recipe(recipe_file, overrides)
    stage = next(s for s in plan_stages(recipe) if s.name == stage_name)
    stage = resolve_stage(stage, out)
    config = stage_train_config(stage, recipe)
    ckpt = Checkpoint(
        arch=config.arch,
        model_options={},
        num_classes=10,
        model={"w": torch.zeros(1)},
        epoch=config.epochs if epoch is None else epoch,
        config=config.to_dict(),
    )
    save_checkpoint(ckpt.to_payload(), stage.run_dir / "checkpoint.pt")
    return stage, recipe


def test_seeds_make_one_run_per_network_mode_seed(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path))
    stages = plan_stages(recipe)
    trains = [s for s in stages if s.kind in ("train", "advtrain")]
    assert [s.name for s in trains] == [
        "train resnet26-regular-s0",
        "advtrain resnet26-adversarial-s0",
        "train resnet26-regular-s1",
        "advtrain resnet26-adversarial-s1",
        "train resnet26-regular-s2",
        "advtrain resnet26-adversarial-s2",
        "train lrnet26-regular-s5",
    ]
    assert [s.name for s in stages if s.kind == "eval"] == [
        t.name.replace("advtrain", "eval").replace("train", "eval") for t in trains
    ]
    for stage in trains:  # the seed goes into the run's TrainConfig
        assert stage_train_config(resolve_stage(stage, tmp_path), recipe).seed == stage.seed
        assert stage.run_dir == Path(f"{stage.arch}-{stage.mode}-s{stage.seed}")
    # no seeds: the [train] seed alone, as before
    single = load_recipe(_recipe(tmp_path, SEEDED.replace("seeds = [0, 1, 2]\n", ""), "one.toml"))
    names = [s.name for s in plan_stages(single) if s.kind == "train"]
    assert names == ["train resnet26-regular-s0", "train lrnet26-regular-s5"]
    one = single.train_config(single.networks[0], "regular", tmp_path, seed=None)
    assert one.seed == 0


def test_set_seeds_or_one_train_seed_gives_new_runs(tmp_path: Path) -> None:
    """``--set seeds=[...]`` replaces the study's seeds; ``--set train.seed=N`` asks for seed N
    alone (issue 21: a rerun with another seed trains new models, the old ones untouched); a
    network's own seeds stay its own."""
    recipe_file = _recipe(tmp_path)

    def trains(overrides: list[str]) -> list[str]:
        stages = plan_stages(load_recipe(recipe_file, overrides))
        return sorted(s.name for s in stages if s.kind == "train")

    assert trains(["train.seed=7"]) == ["train lrnet26-regular-s5", "train resnet26-regular-s7"]
    assert trains(["seeds=[7, 8]"]) == [
        "train lrnet26-regular-s5",
        "train resnet26-regular-s7",
        "train resnet26-regular-s8",
    ]
    with pytest.raises(RecipeError, match="seeds must be"):
        load_recipe(recipe_file, ["seeds=[-1]"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("seeds = [0, 1, 2]", "seeds = []"), "seeds must be"),
        (lambda t: t.replace("seeds = [0, 1, 2]", "seeds = [0, 0]"), "seeds must be"),
        (lambda t: t.replace("seeds = [0, 1, 2]", 'seeds = ["a"]'), "seeds must be"),
        (lambda t: t.replace("epochs = 2", "epochs = 2\nseed = 4"), "remove [train] seed"),
        (lambda t: t.replace("seeds = [5]", "seeds = [5]\nseed = 1"), "not both"),
        (lambda t: t.replace("limit = 16", "limit = 16\nsweep_seeds = -1"), "sweep_seeds"),
    ],
)
def test_bad_seeds_are_one_line_errors(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, edit(SEEDED)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sweep_suite_runs_on_sweep_seeds_only(tmp_path: Path) -> None:
    suite = tmp_path / "sweep.toml"
    suite.write_text(
        '[[attack]]\nname = "pgd-untargeted"\neps = "16/255"\nsteps = 2\n'  # already in eval
        '[[attack]]\nname = "pgd-untargeted"\neps = "32/255"\nsteps = 2\n'
    )
    text = SEEDED.replace(
        "limit = 16", f'limit = 16\nsweep_suite = "{suite}"\nsweep_seeds = [0, 2]'
    )
    recipe = load_recipe(_recipe(tmp_path, text))
    base = recipe.eval.attacks
    assert recipe.eval.attacks_for(1) == base
    for seed in (0, 2):
        extra = recipe.eval.attacks_for(seed)[len(base) :]
        assert [a.eps for a in extra] == [32 / 255]  # the duplicate PGD is run once
    default = load_recipe(_recipe(tmp_path, text.replace("sweep_seeds = [0, 2]", ""), "d.toml"))
    assert default.eval.sweep_seeds == (0,)
    assert len(default.eval.attacks_for(0)) == len(base) + 1


@pytest.mark.slow
def test_train_key_covers_what_decides_the_weights(tmp_path: Path) -> None:
    recipe_file = _recipe(tmp_path)
    base = load_recipe(recipe_file)
    net = base.networks[0]
    key = train_key(base.train_config(net, "adversarial", tmp_path / "a", seed=0))
    assert key == train_key(base.train_config(net, "adversarial", tmp_path / "b", seed=0))
    assert key != train_key(base.train_config(net, "adversarial", tmp_path / "a", seed=1))
    for pair in ("train.lr=0.5", "train.width=0.5", 'adversarial.eps="8/255"', "train.epochs=3"):
        other = load_recipe(recipe_file, [pair])
        changed = other.train_config(other.networks[0], "adversarial", tmp_path / "a", seed=0)
        assert train_key(changed) != key, pair
    for pair in ("data.num_workers=2", 'train.device="cpu"', "train.checkpoint_every_steps=9"):
        same = load_recipe(recipe_file, [pair])
        assert train_key(same.train_config(same.networks[0], "adversarial", tmp_path, 0)) == key


@pytest.mark.slow
def test_changed_training_settings_are_never_reused(tmp_path: Path) -> None:
    recipe_file, out = _recipe(tmp_path), tmp_path / "study"
    name = "train resnet26-regular-s0"
    _fake_training(recipe_file, out, name)
    assert _statuses(recipe_file, out)[name] == (DONE, "2 epochs")
    # a longer schedule or a new learning rate: a conflict naming the setting
    for pair, words in (("train.epochs=8", "train.epochs was 2, now 8"), ("train.lr=0.5", "lr")):
        state, detail = _statuses(recipe_file, out, pair)[name]
        assert state == CONFLICT and words in detail, detail
    # unfinished checkpoints of the same settings resume
    _fake_training(recipe_file, out, name, epoch=1)
    assert _statuses(recipe_file, out)[name] == (PENDING, "resumes after epoch 1/2")
    # a new seed is a new run (the old one untouched)
    stages = _statuses(recipe_file, out, "train.epochs=2")  # same as before
    assert "train resnet26-regular-s7" not in stages
    seeded7 = _statuses(_recipe(tmp_path, SEEDED.replace("[0, 1, 2]", "[7]"), "s7.toml"), out)
    assert seeded7["train resnet26-regular-s7"][0] == PENDING


@pytest.mark.slow
def test_cli_refuses_changed_settings_and_another_recipe(tmp_path: Path) -> None:
    recipe_file, out = _recipe(tmp_path), tmp_path / "study"
    _fake_training(recipe_file, out, "train resnet26-regular-s0")
    before = (out / "resnet26-regular-s0" / "checkpoint.pt").read_bytes()
    result = invoke_cli(
        "run", str(recipe_file), "--out", str(out), "--set", "train.lr=0.5", cwd=tmp_path
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "train.lr was" in lines[0] and "another --out" in lines[0]
    assert (out / "resnet26-regular-s0" / "checkpoint.pt").read_bytes() == before
    dry = invoke_cli(
        "run",
        str(recipe_file),
        "--out",
        str(out),
        "--set",
        "train.lr=0.5",
        "--dry-run",
        cwd=tmp_path,
    )
    assert dry.exit_code == 0 and "conflict" in dry.output
    # the folder belongs to its recipe
    write_json(out / STUDY_MARKER, {"recipe": "table9-digits"})
    with pytest.raises(StudyError, match="recipe 'table9-digits', not 'seeded'"):
        study_status(load_recipe(recipe_file), out)
    result = invoke_cli("run", str(recipe_file), "--out", str(out), "--dry-run", cwd=tmp_path)
    assert result.exit_code == 2 and "another --out" in result.output


@pytest.mark.slow
def test_training_into_the_study_root_or_a_run_is_not_done(tmp_path: Path) -> None:
    """``robustlr train --out STUDY`` (or into one of its runs, with other settings) leaves a
    checkpoint the study does not take for its own."""
    recipe_file, out = _recipe(tmp_path), tmp_path / "study"
    name = "train resnet26-regular-s0"
    stage, recipe = _fake_training(recipe_file, out, name)
    # a checkpoint.pt in the study root is nobody's run
    (out / "checkpoint.pt").write_bytes((stage.run_dir / "checkpoint.pt").read_bytes())
    states = _statuses(recipe_file, out)
    assert states[name][0] == DONE
    assert all(st == PENDING for n, (st, _) in states.items() if n != name)
    # a run trained by hand with another seed into the run folder
    other = recipe.train_config(recipe.networks[0], "regular", stage.run_dir, seed=9)
    ckpt = Checkpoint("resnet26", {}, 10, {"w": torch.zeros(1)}, 2, config=other.to_dict())
    save_checkpoint(ckpt.to_payload(), stage.run_dir / "checkpoint.pt")
    state, detail = _statuses(recipe_file, out)[name]
    assert state == CONFLICT and "train.seed was 9, now 0" in detail


@pytest.mark.slow
def test_eval_and_report_are_keyed_by_their_settings(tmp_path: Path) -> None:
    recipe_file, out = _recipe(tmp_path), tmp_path / "study"
    stage, recipe = _fake_training(recipe_file, out, "train resnet26-regular-s0")
    ev = resolve_stage(
        next(s for s in plan_stages(recipe) if s.name == "eval resnet26-regular-s0"), out
    )
    digest = file_sha256(stage.run_dir / "checkpoint.pt")
    header = "attack,checkpoint_sha256\n"
    (stage.run_dir / "eval.csv").write_text(header + f"clean,{digest}\npgd-untargeted,{digest}\n")
    assert stage_status(ev, recipe, out).state == PENDING  # no eval-key.json: not finished
    write_json(stage.run_dir / EVAL_KEY, {"key": eval_key(ev, recipe)})
    assert stage_status(ev, recipe, out).state == DONE
    for pair in ("eval.limit=32", "eval.batch_size=7", 'eval.split="val"'):
        changed = load_recipe(recipe_file, [pair])
        assert stage_status(ev, changed, out).state == PENDING, pair
    # the eval key follows its training's key (a seed-blind key would pass this run's rows off
    # as another seed's)
    other = next(s for s in plan_stages(recipe) if s.name == "eval resnet26-regular-s1")
    assert eval_key(resolve_stage(other, out), recipe) != eval_key(ev, recipe)
