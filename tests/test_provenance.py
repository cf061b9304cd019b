"""Every row says what produced it (issue 21): a checkpoint records its data set's identity and
evaluation refuses other data; the checkpoint hash is of the bytes loaded and of the contents
only; writers leave no temp files; output faults and loose options give one ``Error:`` line."""

from __future__ import annotations

import csv
import errno
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, assert_one_error, invoke_cli, shared_data_dir

import robustlr.checkpoint as checkpoint_module
import robustlr.runs as runs_module
from robustlr.attacks.spec import AttackSpec, parse_number
from robustlr.checkpoint import read_checkpoint, write_checkpoint
from robustlr.eval.session import append_rows, open_checkpoint
from robustlr.report.results import read_result_csv
from robustlr.runs import BEST, CHECKPOINT, EVAL_CSV, atomic_write, temp_glob
from robustlr.study.recipe import RecipeError, load_recipe

MNIST = shared_data_dir() / "mnist.npz"
EVAL = ["eval", "--attack", "fgsm", "--limit", "8", "--device", "cpu"]


def _small_mnist(path: Path, **changes: np.ndarray) -> Path:
    """The first 200 training and 100 test images of MNIST as an .npz (arrays replaced by
    ``changes``)."""
    with np.load(MNIST) as z:
        arrays = {
            "x_train": z["x_train"][:200],
            "y_train": z["y_train"][:200],
            "x_test": z["x_test"][:100],
            "y_test": z["y_test"][:100],
        }
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny digits run and a tiny MNIST run (on a 200-image .npz)."""
    if not MNIST.is_file():
        pytest.skip(f"needs {MNIST} (set ROBUSTLR_DATA_DIR)")
    cwd = tmp_path_factory.mktemp("provenance")
    npz = _small_mnist(cwd / "mnist-small.npz")
    digits = invoke_cli("train", *TINY_TRAIN, "--out", "digits", cwd=cwd)
    assert digits.exit_code == 0, digits.output
    mnist = invoke_cli(
        "train", *TINY_TRAIN, "--dataset", "mnist", "--data", str(npz), "--out", "mnist", cwd=cwd
    )
    assert mnist.exit_code == 0, mnist.output
    return {"cwd": cwd, "digits": cwd / "digits", "mnist": cwd / "mnist", "npz": npz}


# ---- 2. data identity ----------------------------------------------------------------------------
def test_a_checkpoint_records_its_test_splits_identity(runs) -> None:
    record = read_checkpoint(runs["mnist"] / CHECKPOINT).data
    assert record is not None and record.name == "mnist" and record.num_classes == 10
    assert record.source_shape == (1, 28, 28)
    assert len(record.fingerprint) == 64


def test_a_digits_run_evaluated_on_mnist_is_refused_and_writes_no_row(runs) -> None:
    out = invoke_cli(*EVAL, "--checkpoint", "digits", "--data", str(MNIST), cwd=runs["cwd"])
    assert out.exit_code == 2
    assert_one_error(out.output, "digits")
    assert not (runs["digits"] / EVAL_CSV).exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "change", "named"),
    [
        ("rgb", lambda x: np.repeat(x, 3, axis=-1), "channels 1 recorded, 3 here"),
        ("small", lambda x: x[:, ::4, ::4], "image size 28x28 recorded, 7x7 here"),
        ("large", lambda x: np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))), "image size"),
        ("other", lambda x: 255 - x, "test split fingerprint"),
    ],
)
def test_other_data_is_refused_naming_what_differs_unless_allowed(
    runs, tmp_path, name, change, named
) -> None:
    with np.load(runs["npz"]) as z:
        npz = _small_mnist(tmp_path / f"{name}.npz", x_test=change(z["x_test"]))
    csv_path = runs["mnist"] / EVAL_CSV
    before = _rows(csv_path)
    out = invoke_cli(*EVAL, "--checkpoint", "mnist", "--data", str(npz), cwd=runs["cwd"])
    assert out.exit_code == 2
    assert_one_error(out.output, named, "--allow-other-data")
    assert _rows(csv_path) == before
    allowed = invoke_cli(
        *EVAL, "--checkpoint", "mnist", "--data", str(npz), "--allow-other-data", cwd=runs["cwd"]
    )
    assert allowed.exit_code == 0, allowed.output
    new = _rows(csv_path)[len(before) :]
    assert [r["dataset"] for r in new] == [npz.name] * 2  # clean + fgsm, named by the data used
    recorded = read_checkpoint(runs["mnist"] / CHECKPOINT).data.fingerprint
    assert all(r["data_sha256"] for r in new)
    if name != "rgb":  # grey replicated to RGB holds the same pixels as MNIST served
        assert all(r["data_sha256"] != recorded for r in new)


def test_the_same_data_at_another_path_is_accepted(runs, tmp_path) -> None:
    copy = shutil.copy(runs["npz"], tmp_path / "elsewhere.npz")
    out = invoke_cli(*EVAL, "--checkpoint", "mnist", "--data", str(copy), cwd=runs["cwd"])
    assert out.exit_code == 0, out.output
    last = _rows(runs["mnist"] / EVAL_CSV)[-1]
    assert last["dataset"] == "mnist"
    assert last["data_sha256"] == read_checkpoint(runs["mnist"] / CHECKPOINT).data.fingerprint


@pytest.mark.parametrize(
    ("labels", "named"),
    [
        (lambda y: y + 10, "labels must lie in [0, 9]"),
        (lambda y: y * 5, "labels must lie in [0, 9]"),  # 50 classes
        (lambda y: y.astype(np.float32), "labels must be integers"),
        (lambda y: np.eye(10, dtype=np.int64)[y], "1-D"),
    ],
)
def test_bad_labels_are_one_error_line(runs, tmp_path, labels, named) -> None:
    with np.load(runs["npz"]) as z:
        npz = _small_mnist(tmp_path / "labels.npz", y_test=labels(z["y_test"]))
    out = invoke_cli(
        *EVAL, "--checkpoint", "mnist", "--data", str(npz), "--allow-other-data", cwd=runs["cwd"]
    )
    assert out.exit_code == 2
    assert_one_error(out.output, named)


def _broken_copy(run: Path, dest: Path, edit) -> Path:
    saved = read_checkpoint(run / CHECKPOINT)
    edit(saved)
    dest.mkdir()
    write_checkpoint(saved, dest / CHECKPOINT)
    return dest


@pytest.mark.slow
def test_nan_weights_unknown_options_and_nan_logits_are_one_line(runs, tmp_path) -> None:
    def nan_weight(c) -> None:
        name = next(k for k, v in c.model.items() if v.is_floating_point() and v.ndim == 4)
        c.model[name][0].fill_(float("nan"))

    def unknown_option(c) -> None:
        c.model_options["no_such_option"] = 1

    def nan_logits(c) -> None:  # finite weights whose output is NaN (a negative BN variance)
        name = next(k for k in c.model if k.endswith("running_var"))
        c.model[name].fill_(-1.0)

    for label, edit, named in (
        ("nan", nan_weight, "NaN/inf value(s): the model is broken"),
        ("option", unknown_option, "no_such_option"),
        ("logits", nan_logits, "NaN/inf logits"),
    ):
        run = _broken_copy(runs["digits"], tmp_path / label, edit)
        out = invoke_cli(*EVAL, "--checkpoint", str(run), cwd=runs["cwd"])
        assert out.exit_code == 2, label
        assert_one_error(out.output, named)
        assert not (run / EVAL_CSV).exists()


# ---- 3. the hash is of the bytes loaded, and of the contents only ------------------------------
def test_the_recorded_hash_is_of_the_bytes_loaded_even_when_the_file_is_replaced(
    runs, tmp_path, monkeypatch
) -> None:
    path = tmp_path / CHECKPOINT
    shutil.copy(runs["digits"] / CHECKPOINT, path)
    loaded = path.read_bytes()
    other = read_checkpoint(path)
    other.epoch += 7  # other bytes
    real_load = torch.load

    def load_then_replace(*args, **kwargs):
        payload = real_load(*args, **kwargs)
        write_checkpoint(other, path)  # a writer replaces the file right after the load
        return payload

    monkeypatch.setattr(checkpoint_module.torch, "load", load_then_replace)
    target = open_checkpoint(path, torch.device("cpu"))
    assert target.saved.epoch == 1
    assert target.meta["checkpoint_sha256"] == hashlib.sha256(loaded).hexdigest()
    assert path.read_bytes() != loaded


def test_a_checkpoints_hash_depends_on_its_contents_only(runs, tmp_path) -> None:
    saved = read_checkpoint(runs["digits"] / CHECKPOINT)
    assert "out" not in saved.config  # the run directory is not part of the checkpoint
    a, b = tmp_path / "a" / "x", tmp_path / "elsewhere" / "b"
    for folder in (a, b):
        saved.config["out"] = str(folder)
        write_checkpoint(saved, folder / CHECKPOINT)
    assert (a / CHECKPOINT).read_bytes() == (b / CHECKPOINT).read_bytes()


@pytest.mark.slow
def test_report_leaves_out_rows_of_a_replaced_checkpoint(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["digits"], run)
    out = invoke_cli(*EVAL, "--checkpoint", str(run / CHECKPOINT), cwd=runs["cwd"])
    assert out.exit_code == 0, out.output
    assert len(read_result_csv(run / EVAL_CSV)) == 2
    (run / BEST).unlink()
    replaced = read_checkpoint(run / CHECKPOINT)
    replaced.epoch = 2  # e.g. train --resume replaced it
    write_checkpoint(replaced, run / CHECKPOINT)
    out = invoke_cli(*EVAL, "--checkpoint", str(run / CHECKPOINT), cwd=runs["cwd"])
    assert out.exit_code == 0, out.output
    current = read_result_csv(run / EVAL_CSV)
    assert len(current) == 2
    assert set(current["checkpoint_sha256"]) == {read_checkpoint(run / CHECKPOINT).sha256}


# ---- 4. writers ---------------------------------------------------------------------------------
def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path) -> None:
    target = tmp_path / "f.npz"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as info:
        atomic_write(target, _full_disk)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
    assert temp_glob("f.npz") == ".f.npz.*.tmp"


def test_a_failed_append_leaves_no_partial_row(tmp_path, monkeypatch) -> None:
    path = tmp_path / EVAL_CSV
    append_rows(path, [{"run": "a", "accuracy": 1.0}])
    before = path.read_bytes()
    calls = {"n": 0}
    os_write = runs_module.os.write

    def half_then_full(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return os_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs_module.os, "write", half_then_full)
    with pytest.raises(OSError):
        append_rows(path, [{"run": "b", "accuracy": 2.0}] * 3)
    assert path.read_bytes() == before


# ---- 5. output faults and options ---------------------------------------------------------------
def test_an_out_under_a_file_is_refused_before_any_work(runs, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cwd = runs["cwd"]
    cases = [
        ([*EVAL, "--checkpoint", "digits", "--out", str(blocker / "eval.csv")], "--out"),
        (["train", *TINY_TRAIN, "--out", str(blocker / "run")], "--out"),
        (["run", "table9-digits", "--out", str(blocker / "study")], "--out"),
        (["report", "--runs", str(runs["cwd"]), "--out", str(blocker / "t.csv")], "--out"),
    ]
    for args, named in cases:
        out = invoke_cli(*args, cwd=cwd)
        assert out.exit_code == 2, (args, out.output)
        assert_one_error(out.output, named, "is a file")
        assert "eval resnet26" not in out.output  # eval: refused before loading anything


def test_set_values_are_checked_against_the_recipe_schema() -> None:
    for pair, named in (
        ('report.plots="no"', "expects bool"),
        ('report.attack_steps="ten"', "expects int"),
        ("train.warmup_epochs=-3", ">= 0"),
        ('adversarial.steps="3"', "expects int"),
        ("train.epochs=0", "> 0"),
        ("train.lr=1.5e-400", "> 0"),
    ):
        with pytest.raises(RecipeError, match=named):
            load_recipe("table9-digits", [pair])
    recipe = load_recipe(
        "table9-digits", ['adversarial.eps="8/255"', "report.plots=false", "train.lr=0.5"]
    )
    assert recipe.report.plots is False


def test_eps_bounds_follow_the_norm_and_l2_prints_plain() -> None:
    with pytest.raises(ValueError, match="rounds to 0"):
        parse_number("1e-400")
    assert parse_number("0") == 0.0
    spec = AttackSpec("pgd-untargeted", norm="l2", eps=2.0)
    assert spec.describe().startswith("pgd-untargeted l2 eps=2 step=0.5")
    assert "eps=16/255" in AttackSpec("pgd-untargeted").describe()
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        AttackSpec("pgd-untargeted", norm="linf", eps=2.0)
    spec.check_images((3, 16, 16))  # diameter 27.7
    with pytest.raises(ValueError, match="diameter"):
        AttackSpec("pgd-untargeted", norm="l2", eps=30.0).check_images((3, 16, 16))


def test_cli_takes_an_l2_radius_and_refuses_an_eps_rounding_to_zero(runs) -> None:
    cwd = runs["cwd"]
    base = ["eval", "--attack", "pgd-untargeted", "--steps", "1", "--limit", "4"]
    ok = invoke_cli(*base, "--checkpoint", "digits", "--norm", "l2", "--eps", "2.0", cwd=cwd)
    assert ok.exit_code == 0, ok.output
    row = _rows(runs["digits"] / EVAL_CSV)[-1]
    assert (row["norm"], float(row["eps"])) == ("l2", 2.0)
    for eps, named in (("1e-400", "rounds to 0"), ("30", "diameter")):
        out = invoke_cli(*base, "--checkpoint", "digits", "--norm", "l2", "--eps", eps, cwd=cwd)
        assert out.exit_code == 2
        assert_one_error(out.output, named)
