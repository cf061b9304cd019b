"""torchattacks adapters: APGD-CE, APGD-T, FAB, Square, CW and the AutoAttack ensembles behind
``AttackSpec`` (the attacks whose registry ``runner`` is ``torchattacks``).

torchattacks is an optional dependency (``pip install torchattacks``). ``attack_settings``
states the exact settings each adapter runs with (they go into the result row), and every
attack runs in fp32 (torchattacks has no autocast) with the global RNG state restored
afterwards (torchattacks re-seeds it). Results depend on the batch: torchattacks seeds one
generator per call, not per image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustlr.attacks.registry import names_where
from robustlr.attacks.spec import AttackSpec

TORCHATTACKS_NAMES = names_where(runner="torchattacks")

# The original AutoAttack's standard settings (Croce & Hein 2020, github.com/fra31/auto-attack):
# APGD-CE 100 iterations, APGD-T and FAB-T 100 iterations over 9 target classes, Square 5000
# queries with p_init 0.8 and no schedule rescaling; 1 restart each.
STANDARD_ITERATIONS = 100
STANDARD_TARGET_CLASSES = 9
STANDARD_QUERIES = 5000
SQUARE_P_INIT = 0.8
APGD_RHO = 0.75


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise RuntimeError("this attack needs torchattacks: pip install torchattacks") from None
    return torchattacks


def _norm(spec: AttackSpec) -> str:
    return {"linf": "Linf", "l2": "L2"}[spec.norm]


def _targets(num_classes: int) -> int:
    """Target classes of the standard ensemble: 9, or every wrong class when there are fewer."""
    return min(STANDARD_TARGET_CLASSES, num_classes - 1)


def _settings(spec: AttackSpec, num_classes: int) -> list[tuple[str, dict[str, Any]]]:
    """(torchattacks class, keyword arguments) of every attack ``spec`` runs, in order."""
    common = {"norm": _norm(spec), "eps": spec.eps, "seed": spec.seed}
    if spec.name == "apgd-ce":
        kw = {"steps": spec.steps, "n_restarts": spec.restarts, "loss": "ce", "rho": APGD_RHO}
        return [("APGD", {**common, **kw})]
    if spec.name == "apgd-t":
        kw = {"steps": spec.steps, "n_restarts": spec.restarts, "n_classes": num_classes}
        return [("APGDT", {**common, **kw, "rho": APGD_RHO})]
    if spec.name == "fab":
        kw = {"steps": spec.steps, "n_restarts": spec.restarts, "n_classes": num_classes}
        return [("FAB", {**common, **kw, "multi_targeted": False})]
    if spec.name == "square":
        kw = {"n_queries": spec.queries, "n_restarts": spec.restarts, "p_init": SQUARE_P_INIT}
        return [("Square", {**common, **kw, "resc_schedule": True})]
    if spec.name == "cw":
        return [("CW", {"c": 1.0, "kappa": 0.0, "steps": spec.steps, "lr": 0.01})]
    if spec.name == "autoattack":
        # torchattacks' APGDT / FAB attack n_classes - 1 targets: pass targets + 1 classes
        n = _targets(num_classes) + 1
        return [
            ("APGD", {**common, "steps": STANDARD_ITERATIONS, "n_restarts": 1, "loss": "ce"}),
            ("APGDT", {**common, "steps": STANDARD_ITERATIONS, "n_restarts": 1, "n_classes": n}),
            (
                "FAB",
                {
                    **common,
                    "steps": STANDARD_ITERATIONS,
                    "n_restarts": 1,
                    "n_classes": n,
                    "multi_targeted": True,
                },
            ),
            (
                "Square",
                {
                    **common,
                    "n_queries": STANDARD_QUERIES,
                    "n_restarts": 1,
                    "p_init": SQUARE_P_INIT,
                    "resc_schedule": False,
                },
            ),
        ]
    # torchattacks.AutoAttack's reduced ensembles as of torchattacks 3.5.1: 10-step attacks
    reduced = {**common, "steps": 10, "n_restarts": 1}
    apgdt_10 = ("APGDT", {**reduced, "n_classes": num_classes})
    fab_t_10 = ("FAB", {**reduced, "n_classes": num_classes, "multi_targeted": True})
    square_5000 = ("Square", {**common, "n_queries": 5000, "n_restarts": 1, "resc_schedule": True})
    if spec.name == "autoattack-fast":  # AutoAttack(version="standard")
        return [("APGD", {**reduced, "loss": "ce"}), apgdt_10, fab_t_10, square_5000]
    if spec.name == "autoattack-plus":  # AutoAttack(version="plus")
        return [
            ("APGD", {**reduced, "n_restarts": 5, "loss": "ce"}),
            ("APGD", {**reduced, "n_restarts": 5, "loss": "dlr"}),
            ("FAB", {**reduced, "n_restarts": 5, "n_classes": num_classes}),
            square_5000,
            apgdt_10,
            fab_t_10,
        ]
    raise ValueError(f"{spec.name!r} is not a torchattacks attack")


def attack_settings(spec: AttackSpec, num_classes: int) -> str:
    """The exact settings the adapter runs ``spec`` with, e.g. ``APGD(steps=100, ...)``; for
    an ensemble every member in order, joined by `` + `` (the eval row's ``attack_settings``)."""
    parts = []
    for cls, kw in _settings(spec, num_classes):
        shown = {k: v for k, v in kw.items() if k not in ("eps", "seed", "norm")}
        if cls in ("APGDT", "FAB") and "n_classes" in shown:
            shown["n_target_classes"] = shown.pop("n_classes") - 1
        parts.append(f"{cls}({', '.join(f'{k}={v}' for k, v in shown.items())})")
    return " + ".join(parts)


def build_torchattack(model: nn.Module, spec: AttackSpec, num_classes: int):
    """The torchattacks object for ``spec`` (model must take [0, 1] inputs)."""
    ta = _torchattacks()
    made = [getattr(ta, cls)(model, **kw) for cls, kw in _settings(spec, num_classes)]
    return made[0] if len(made) == 1 else ta.MultiAttack(made)


def _rng_devices(x: torch.Tensor) -> list[int]:
    return [x.device.index or 0] if x.device.type == "cuda" else []


def torchattacks_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AttackSpec,
    num_classes: int,
    build: Callable[[nn.Module, AttackSpec, int], Any] = build_torchattack,
) -> torch.Tensor:
    """Adversarial images from torchattacks; the global RNG state is restored afterwards.

    Shape: x (B, C, H, W), y (B,) -> like x.
    """
    adversary = build(model, spec, num_classes)
    with torch.random.fork_rng(devices=_rng_devices(x)):
        return adversary(x, y).detach()
