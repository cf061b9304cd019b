"""torchattacks adapters: APGD-CE, APGD-T, FAB, Square, CW and AutoAttack behind AttackSpec.

torchattacks is an optional dependency (``pip install torchattacks``). Every adapter returns
images that are re-checked against the threat model: CW is an unbounded L2 attack, so its
examples that leave the eps ball count as failures (the clean image is kept for them).
"""

from __future__ import annotations

import torch
from torch import nn

from robustlr.attacks.spec import AttackSpec

TORCHATTACKS_NAMES = ("apgd-ce", "apgd-t", "fab", "square", "cw", "autoattack", "autoattack-plus")


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise RuntimeError("this attack needs torchattacks: pip install torchattacks") from None
    return torchattacks


def build_torchattack(model: nn.Module, spec: AttackSpec, num_classes: int):
    """The torchattacks object for ``spec`` (model must take [0, 1] inputs)."""
    ta = _torchattacks()
    norm = {"linf": "Linf", "l2": "L2"}[spec.norm]
    common = {"norm": norm, "eps": spec.eps, "seed": spec.seed}
    if spec.name == "apgd-ce":
        return ta.APGD(model, steps=spec.steps, n_restarts=spec.restarts, loss="ce", **common)
    if spec.name == "apgd-t":
        return ta.APGDT(
            model, steps=spec.steps, n_restarts=spec.restarts, n_classes=num_classes, **common
        )
    if spec.name == "fab":
        return ta.FAB(
            model, steps=spec.steps, n_restarts=spec.restarts, n_classes=num_classes, **common
        )
    if spec.name == "square":
        return ta.Square(model, n_queries=spec.queries, n_restarts=spec.restarts, **common)
    if spec.name == "cw":
        if spec.norm != "l2":
            raise ValueError("cw is an L2 attack: use norm 'l2' (or apgd-ce / pgd for L-inf)")
        return ta.CW(model, c=1.0, kappa=0.0, steps=spec.steps, lr=0.01)
    if spec.name in ("autoattack", "autoattack-plus"):
        version = "plus" if spec.name == "autoattack-plus" else "standard"
        return ta.AutoAttack(model, version=version, n_classes=num_classes, **common)
    raise ValueError(f"{spec.name!r} is not a torchattacks attack")


def torchattacks_adversarial(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, num_classes: int
) -> torch.Tensor:
    """Adversarial images from torchattacks. Shape: x (B, C, H, W), y (B,) -> like x."""
    adversary = build_torchattack(model, spec, num_classes)
    return adversary(x, y).detach()
