"""Sanity checks that need the model itself: eval-mode determinism, then a step sweep, an eps
sweep, a bf16-vs-fp32 attack and targeted-vs-untargeted PGD on a subset, judged by the
result-based checks of ``robustlr.report.checks`` (``robustlr check``); and the report's own
model checks (``model_checks``): determinism of every report run and transfer between the
networks, from the runs' checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from robustlr.attacks.run import run_attack
from robustlr.attacks.spec import AttackSpec
from robustlr.eval.runner import RESULT_COLUMNS, evaluate, subset_sha256
from robustlr.eval.stats import mcnemar
from robustlr.report.checks import (
    CheckResult,
    check_eps_sweep,
    check_low_precision,
    check_monotone,
    check_untargeted_le_targeted,
    check_zero_gradients,
)
from robustlr.report.results import normalise_results, row_outcomes

log = logging.getLogger(__name__)

SWEEP_STEPS = (10, 20, 50, 100)
EPS_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DETERMINISM_TOL = 1e-5


@dataclass
class LiveChecks:
    """Result rows (eval.csv format, ``RESULT_COLUMNS``) and the checks judged from them."""

    rows: pd.DataFrame
    checks: list[CheckResult]


@torch.no_grad()
def check_determinism(
    model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu"
) -> CheckResult:
    """Eval mode: the same batch twice gives the same logits, and a half batch gives the same
    logits as inside the full batch (no batch statistics, no dropout). The model's
    train/eval flag is restored.

    Shape: images (N, C, H, W) on [0, 1], N >= 2.
    """
    was_training = model.training
    model.eval()
    try:
        x = images.to(device)
        first, second = model(x).float(), model(x).float()
        half = model(x[: max(1, len(x) // 2)]).float()
    finally:
        model.train(was_training)
    repeat = float((first - second).abs().max())
    batch = float((first[: len(half)] - half).abs().max())
    scale = max(float(first.abs().max()), 1.0)
    worst = max(repeat, batch) / scale
    numbers = f"max |diff| repeat {repeat:.2e}, half batch {batch:.2e} (logit scale {scale:.3g})"
    if repeat == 0 and worst <= DETERMINISM_TOL:
        status, message = "pass", "eval-mode logits are deterministic and batch-independent"
    elif worst <= 1e-3:
        status = "warn"
        message = "eval-mode logits vary slightly (non-deterministic kernels or batch effects)"
    else:
        status = "fail"
        message = "eval-mode logits depend on the batch or the call: BN/dropout not in eval mode?"
    return CheckResult("eval_determinism", status, "model", numbers, message)


def live_specs(
    eps: float,
    steps: Sequence[int] = SWEEP_STEPS,
    eps_factors: Sequence[float] = EPS_FACTORS,
    sweep_steps: int = 10,
    low_precision: str | None = "bf16",
    seed: int = 0,
) -> list[AttackSpec]:
    """The attacks of a live check (duplicates removed): clean; untargeted PGD at ``eps`` for
    every step count (Madry step size 2.5 eps / steps); untargeted PGD with ``sweep_steps`` at
    every eps factor (capped at 1); targeted PGD at ``eps``; the same untargeted PGD in
    ``low_precision``."""
    specs = [AttackSpec("clean")]
    specs += [AttackSpec("pgd-untargeted", eps=eps, steps=s, seed=seed) for s in steps]
    specs += [
        AttackSpec("pgd-untargeted", eps=min(1.0, eps * f), steps=sweep_steps, seed=seed)
        for f in eps_factors
    ]
    specs.append(AttackSpec("pgd-untargeted", eps=eps, steps=sweep_steps, seed=seed))
    specs.append(AttackSpec("pgd-targeted", eps=eps, steps=sweep_steps, seed=seed))
    if low_precision is not None:
        specs.append(
            AttackSpec(
                "pgd-untargeted", eps=eps, steps=sweep_steps, seed=seed, precision=low_precision
            )
        )
    unique: list[AttackSpec] = []
    for spec in specs:
        if spec not in unique:
            unique.append(spec)
    return unique


def check_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 16 / 255,
    steps: Sequence[int] = SWEEP_STEPS,
    eps_factors: Sequence[float] = EPS_FACTORS,
    sweep_steps: int = 10,
    low_precision: str | None = "bf16",
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    meta: dict[str, Any] | None = None,
    on_batch: Callable[[AttackSpec, int], None] | None = None,
) -> LiveChecks:
    """Run the live checks on ``images`` (pass a subset: every attack runs on all of them).

    ``meta`` fills the rows' run / arch / train_mode / dataset / split columns.
    Shape: images (N, C, H, W) on [0, 1], labels (N,).
    """
    if len(images) < 2:
        raise ValueError("live checks need at least 2 images")
    model = model.to(device)
    checks = [check_determinism(model, images, device)]
    specs = live_specs(eps, steps, eps_factors, sweep_steps, low_precision)
    log.info("live checks: %d attacks on %d images", len(specs), len(images))
    results = evaluate(
        model, images, labels, specs, batch_size=batch_size, device=device, on_batch=on_batch
    )
    meta = {
        "run": "live",
        "subset_sha256": subset_sha256(labels, range(len(labels))),
        **(meta or {}),
    }
    rows = pd.DataFrame([r.row(meta) for r in results], columns=list(RESULT_COLUMNS))
    frame = normalise_results(rows, source="live", run_key=str(meta["run"]))
    checks += [
        *check_monotone(frame, "steps"),
        *check_eps_sweep(frame),
        *check_untargeted_le_targeted(frame),
        *check_low_precision(frame),
        *check_zero_gradients(frame),
    ]
    return LiveChecks(rows, checks)


TRANSFER_EXTRA_SHARE = 0.01  # share of images transfer may break beyond white-box PGD (warn)
TRANSFER_IMAGES = 128  # the first images of the cell crafted on (keeps the report cheap)


def _open_run_model(run_key: str, checkpoint_names: Sequence[str]) -> tuple[Any, str]:
    """(EvalTarget, "") for a run directory's first existing checkpoint, else (None, why)."""
    from robustlr.checkpoint import CheckpointError
    from robustlr.eval.session import open_checkpoint

    run = Path(run_key)
    path = next((run / n for n in checkpoint_names if (run / n).is_file()), None)
    if path is None:
        return None, f"no checkpoint in {run} (looked for {', '.join(checkpoint_names)})"
    try:
        return open_checkpoint(path, torch.device("cpu")), ""
    except CheckpointError as exc:
        return None, f"checkpoint {path} is unreadable ({exc})"


def _cell_images(target: Any, row: pd.Series) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The images of a Table 9 cell (its split, first n), or empty tensors and why not."""
    from robustlr.data.errors import DataError

    try:
        images, labels, indices = target.load_images(str(row["split"]), limit=int(row["n"]))
    except (DataError, OSError, ValueError) as exc:
        return torch.empty(0), torch.empty(0), f"cannot load the test images ({exc})"
    if subset_sha256(labels, indices) != row["subset_sha256"]:
        return torch.empty(0), torch.empty(0), "the test images differ from the evaluated ones"
    return images, labels, ""


def determinism_checks(
    runs: dict[tuple[str, str], str],
    cells: dict[tuple[str, str], pd.Series],
    checkpoint_names: Sequence[str],
    images_per_check: int = 64,
) -> list[CheckResult]:
    """``eval_determinism`` for every report run ({(network, mode): run key}) on the first
    images of its clean cell; skip, naming what is missing, where the model or data is not
    there."""
    out = []
    for (network, mode), run_key in sorted(runs.items()):
        subject = f"{network} ({mode}) {Path(run_key).name}"
        prefix = "adv" if mode == "adversarial" else "regular"
        row = cells.get((network, f"{prefix}_clean"))
        target, why = _open_run_model(run_key, checkpoint_names)
        if target is not None and row is None:
            why = "no clean cell to take images from"
        if target is not None and row is not None:
            images, _, why = _cell_images(target, row)
        if why:
            out.append(
                CheckResult("eval_determinism", "skip", subject, "", f"needs the model: {why}")
            )
            continue
        check = check_determinism(target.model, images[:images_per_check])
        out.append(CheckResult(check.check, check.status, subject, check.numbers, check.message))
    return out


def transfer_checks(
    runs: dict[tuple[str, str], str],
    cells: dict[tuple[str, str], pd.Series],
    networks: Sequence[str],
    checkpoint_names: Sequence[str],
    batch_size: int = 128,
    limit: int = TRANSFER_IMAGES,
) -> list[CheckResult]:
    """``transfer_weaker``: per training mode, Table 9's untargeted PGD crafted on the first
    network's model (on the cell's first ``limit`` images), transferred to every other network
    of that mode, is not stronger than the white-box PGD of its cell (McNemar on the same
    images: fail when transfer breaks significantly more images, warn when it breaks more than
    1% that white-box PGD missed)."""
    name = "transfer_weaker"
    out = []
    for mode, prefix in (("adversarial", "adv"), ("regular", "regular")):
        cell = f"{prefix}_untargeted"
        present = [n for n in networks if (n, cell) in cells and (n, mode) in runs]
        if len(present) < 2:
            out.append(
                CheckResult(
                    name, "skip", mode, "", f"needs two networks with a {cell} cell and a run"
                )
            )
            continue
        source, targets = present[0], present[1:]
        row = cells[(source, cell)]
        model, why = _open_run_model(runs[(source, mode)], checkpoint_names)
        images = labels = torch.empty(0)
        if model is not None:
            images, labels, why = _cell_images(model, row)
            images, labels = images[:limit], labels[:limit]
        if why:
            out.append(
                CheckResult(name, "skip", f"{mode} from {source}", "", f"needs the model: {why}")
            )
            continue
        spec = AttackSpec(
            "pgd-untargeted",
            eps=float(row["eps"]),
            steps=int(row["steps"]),
            step_size=float(row["step_size"]),
            restarts=int(row["restarts"]),
        )
        crafted = []
        for lo in range(0, len(images), batch_size):
            ids = torch.arange(lo, min(lo + batch_size, len(images)))
            x, y = images[lo : lo + batch_size], labels[lo : lo + batch_size]
            crafted.append(run_attack(model.model, x, y, spec, example_ids=ids).x_adv.detach())
        x_adv = torch.cat(crafted)
        for network in targets:
            out.append(
                _transfer_one(
                    name, mode, source, network, runs, cells, cell, x_adv, labels, checkpoint_names
                )
            )
    return out


def _transfer_one(
    name: str,
    mode: str,
    source: str,
    network: str,
    runs: dict[tuple[str, str], str],
    cells: dict[tuple[str, str], pd.Series],
    cell: str,
    x_adv: torch.Tensor,
    labels: torch.Tensor,
    checkpoint_names: Sequence[str],
) -> CheckResult:
    """One target network of ``transfer_checks``."""
    subject = f"{mode}: {source} -> {network}"
    row = cells[(network, cell)]
    if row["subset_sha256"] != cells[(source, cell)]["subset_sha256"]:
        return CheckResult(name, "skip", subject, "", "the two cells are on different images")
    white, why = row_outcomes(row)
    target, why_model = _open_run_model(runs[(network, mode)], checkpoint_names)
    if white is None or target is None:
        return CheckResult(name, "skip", subject, "", f"needs {why or why_model}")
    with torch.no_grad():
        transfer = (target.model(x_adv).argmax(1) == labels).numpy()
    white = white[: len(transfer)]  # the images crafted on: the cell's first ones
    test = mcnemar(white, transfer)  # only_a: white-box missed, transfer broke it
    n = int(white.size)
    numbers = (
        f"transfer {100 * transfer.mean():.1f}%, white-box {100 * white.mean():.1f}%; only "
        f"transfer breaks {test.only_a}/{n}, only white-box {test.only_b}"
    )
    if test.only_a > test.only_b and test.significant():
        status, message = "fail", "transfer beats white-box PGD significantly: gradient masking?"
    elif test.only_a > TRANSFER_EXTRA_SHARE * n:
        status, message = "warn", "transfer breaks images white-box PGD misses: add steps/restarts"
    else:
        status, message = (
            "pass",
            "examples transferred from another network are weaker than white-box PGD",
        )
    return CheckResult(name, status, subject, numbers, message)


def model_checks(
    runs: dict[tuple[str, str], str],
    cells: dict[tuple[str, str], pd.Series],
    networks: Sequence[str],
    checkpoint_names: Sequence[str],
) -> list[CheckResult]:
    """The report's checks that need the models: eval-mode determinism and transfer."""
    return [
        *determinism_checks(runs, cells, checkpoint_names),
        *transfer_checks(runs, cells, networks, checkpoint_names),
    ]
