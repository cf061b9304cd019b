"""Sanity checks that need the model itself: eval-mode determinism, then a step sweep, an eps
sweep, a bf16-vs-fp32 attack and targeted-vs-untargeted PGD on a subset, judged by the
result-based checks of ``robustlr.report.checks``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from robustlr.attacks.spec import AttackSpec
from robustlr.eval.runner import RESULT_COLUMNS, evaluate, subset_sha256
from robustlr.report.checks import (
    CheckResult,
    check_eps_sweep,
    check_low_precision,
    check_monotone,
    check_untargeted_le_targeted,
    check_zero_gradients,
)
from robustlr.report.results import normalise_results

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
