"""The tests' shared helpers (one place; tests import this module, never each other): data
location, CLI subprocesses, fast training arguments, small models and fixtures on disk."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from click.testing import Result
from torch import nn

from robustlr.eval.runner import RESULT_COLUMNS
from robustlr.eval.stats import wilson_interval
from robustlr.runs import CONFIG, EVAL_CSV

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / "robustlr" / "__main__.py")  # the robustlr entry point, runnable as a script

# small and fast: ~0.9M parameters at 16x16
FAST = ["--arch", "resnet26", "--width", "0.25", "--image-size", "16", "--small-input"]


def shared_data_dir() -> Path:
    """``$ROBUSTLR_DATA_DIR`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("ROBUSTLR_DATA_DIR", REPO.parent / "shared" / "data"))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, CLI, *args]


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``robustlr <args>`` in a subprocess; returns the completed process (text)."""
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke_cli(*args: str, cwd: Path) -> Result:
    """Run ``robustlr <args>`` in this process (click's runner; stdout and stderr together in
    ``.output``) from directory ``cwd``: the fast way to test a command."""
    from click.testing import CliRunner

    from robustlr.cli import cli

    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, list(args))
    finally:
        os.chdir(old)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max()})"


def assert_same(a: Any, b: Any, where: str = "value") -> None:
    """Deep equality: dataclasses field by field, containers item by item, tensors by dtype,
    shape and value (bitwise)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: values differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def small_model(seed: int = 0) -> nn.Module:
    """A tiny conv net for 8x8 inputs (BatchNorm and Dropout, to check eval-mode handling)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def random_batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n random 3x8x8 images on [0, 1] and labels of 10 classes, from a seeded generator.
    Shape: -> (n, 3, 8, 8), (n,)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def image_folder(root: Path, corrupt: bool) -> Path:
    """A two-class ImageFolder tree (train: 5 per class, val: 2) of random PNGs; with
    ``corrupt`` one unreadable file in train/dog."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 5), ("val", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "dog" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


REPORT_EPS = 16 / 255  # the eps of the synthetic eval.csv rows below


def row(attack: str, accuracy: float, n: int = 1000, **extra: object) -> dict[str, object]:
    """One eval.csv row with a consistent Wilson interval."""
    k = round(accuracy * n / 100)
    low, high = wilson_interval(k, n)
    attacked = attack != "clean"
    policy = {"pgd-targeted": "random", "pgd-untargeted": "none"}.get(attack, "")
    values: dict[str, object] = {c: "" for c in RESULT_COLUMNS}
    values.update(
        dataset="digits",
        split="test",
        n=n,
        subset_sha256="subset-a",
        attack=attack,
        norm="linf" if attacked else "",
        eps=REPORT_EPS if attacked else 0.0,
        step_size=1 / 255 if attacked else "",
        steps=20 if attacked else 0,
        restarts=1 if attacked else 0,
        target_policy=policy,
        targets_seed=0 if policy == "random" else "",
        targets_sha256="targets-a" if policy == "random" else "",
        precision="fp32",
        accuracy=100 * k / n,
        accuracy_low=100 * low,
        accuracy_high=100 * high,
        zero_grad_fraction=0.0 if attacked else "",
    )
    values.update(extra)
    return values


def write_run(runs: Path, name: str, arch: str, mode: str, rows: list[dict[str, object]]) -> Path:
    run = runs / name
    run.mkdir(parents=True)
    (run / CONFIG).write_text(json.dumps({"arch": arch, "mode": mode}))
    pd.DataFrame(rows).to_csv(run / EVAL_CSV, index=False)
    return run


# a run trained for two steps of one epoch: what checkpoint and eval tests need, in seconds
TINY_TRAIN = [
    *FAST,
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--set",
    "max_steps_per_epoch=2",
    "--set",
    "val_fraction=0.05",
]


def assert_one_error(output: str, *needles: str) -> str:
    """The output of a refused command is exactly one ``Error: ...`` line (containing every
    ``needle``), never a traceback; returns that line."""
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


def write_outcome_run(
    runs: Path,
    name: str,
    arch: str,
    mode: str,
    attacks: list[tuple[object, list[bool] | np.ndarray]],
    train_seed: str = "",
    subset: str = "subset-x",
) -> Path:
    """A run whose eval.csv rows have outcomes files: ``attacks`` pairs an ``AttackSpec`` with
    each image's correctness; targeted specs share the targets hash "targets-x"."""
    from robustlr.eval.runner import AttackResult, save_outcomes

    run = runs / name
    rows = []
    meta = {"run": name, "arch": arch, "train_mode": mode, "train_seed": train_seed,
            "dataset": "digits", "split": "test", "subset_sha256": subset}  # fmt: skip
    for i, (spec, correct) in enumerate(attacks):
        c = np.asarray(correct, dtype=bool)
        sha = "targets-x" if spec.targeted else ""  # type: ignore[attr-defined]
        result = AttackResult(spec, c, ~c, None, passes=0, seconds=0.0, targets_sha256=sha)  # type: ignore[arg-type]
        file = f"outcomes/{i}-{spec.name}.npz"  # type: ignore[attr-defined]
        save_outcomes(run / file, result, result.row(meta))
        rows.append(result.row(meta) | {"outcomes_file": file})
    (run / CONFIG).write_text(json.dumps({"arch": arch, "mode": mode}))
    pd.DataFrame(rows).to_csv(run / EVAL_CSV, index=False)
    return run


def results_with_outcomes(
    directory: Path, results: list, arch: str = "net", mode: str = "regular", run: str = "r"
) -> pd.DataFrame:
    """``evaluate`` results as the report reads them: rows of one run on one image subset,
    each with its outcomes file saved in ``directory``."""
    from robustlr.eval.runner import outcome_filename, save_outcomes
    from robustlr.report.results import normalise_results

    directory.mkdir(parents=True, exist_ok=True)
    meta = {"run": run, "arch": arch, "train_mode": mode, "dataset": "digits", "split": "test"}
    rows = []
    for result in results:
        out = result.row({**meta, "subset_sha256": "subset-a"})
        save_outcomes(directory / outcome_filename(out), result, out)
        out["outcomes_file"] = outcome_filename(out)
        rows.append(out)
    frame = pd.DataFrame(rows)
    return normalise_results(frame, source="test", run_key=str(directory), directory=directory)


def digits_linear_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear classifier of scikit-learn's 8x8 digits (inputs on [0, 1], shape (B, 1, 8, 8)),
    trained full-batch (100 Adam steps, half a second) on the first 1500 images; returns the
    model in eval mode and 100 held-out images and labels. Linear, so every gradient attack
    has an easy, known job: at eps 0.3 (L-inf) or 2 (L2) almost every image can be broken."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1500]), y[:1500]).backward()
        optimizer.step()
    return model.eval(), x[1500:1600], y[1500:1600]


def linear_min_norm_in_box(model: nn.Module, x: torch.Tensor, norm: str) -> torch.Tensor:
    """The exact smallest perturbation that keeps ``x + delta`` in [0, 1] and changes the
    prediction of a linear model ``Sequential(Flatten, Linear)``, per image (inf: none in the
    box). For each other class j it solves min ||delta|| s.t. (w_pred - w_j) . delta <= -margin:
    L2 and L-inf by bisection on t in delta = clip(-t w) (L2) or clip(-t sign w) (L-inf); L1
    greedily, moving the pixels with the largest |w| to their bounds first (a fractional
    knapsack). Computed in float64. Shape: x (B, ...) -> (B,)."""
    weight = model[1].weight.detach().double()
    bias = model[1].bias.detach().double()
    flat = x.flatten(1).double()
    logits = flat @ weight.T + bias
    pred = logits.argmax(1)
    best = torch.full((len(x),), float("inf"), dtype=torch.float64)
    low, high = -flat, 1 - flat  # the box for delta
    for j in range(weight.shape[0]):
        w = weight[pred] - weight[j]
        margin = logits.gather(1, pred[:, None]).squeeze(1) - logits[:, j]
        farthest = torch.where(w > 0, low, high)  # every pixel at its bound against w
        feasible = (pred != j) & (-(w * farthest).sum(1) >= margin)
        if norm == "l1":
            order = w.abs().argsort(1, descending=True)
            gain_per_unit, room = w.abs().gather(1, order), farthest.abs().gather(1, order)
            gain, cost = (gain_per_unit * room).cumsum(1), room.cumsum(1)
            full = (gain < margin[:, None]).sum(1).clamp(max=w.shape[1] - 1)  # pixels at bound
            before = (full - 1).clamp(min=0)[:, None]
            gained = torch.where(full > 0, gain.gather(1, before).squeeze(1), 0.0)
            spent = torch.where(full > 0, cost.gather(1, before).squeeze(1), 0.0)
            size = spent + (margin - gained) / gain_per_unit.gather(1, full[:, None]).squeeze(1)
        else:
            direction = w if norm == "l2" else w.sign()
            lo, hi = torch.zeros_like(margin), torch.full_like(margin, 1e4)
            for _ in range(80):
                t = (lo + hi) / 2
                enough = -(w * (-t[:, None] * direction).clamp(low, high)).sum(1) >= margin
                hi, lo = torch.where(enough, t, hi), torch.where(enough, lo, t)
            delta = (-hi[:, None] * direction).clamp(low, high)
            size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
        best = torch.where(feasible, torch.min(best, size), best)
    return best.float()
