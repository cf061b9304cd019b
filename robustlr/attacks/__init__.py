"""Attacks on [0, 1] images for any ``nn.Module``: PGD / FGSM (own), torchattacks adapters."""

from robustlr.attacks.pgd import AttackOutcome
from robustlr.attacks.registry import ATTACKS, AttackInfo, attack_info, names_where
from robustlr.attacks.run import attack, run_attack
from robustlr.attacks.spec import ATTACK_NAMES, AttackSpec, format_eps, parse_eps
from robustlr.attacks.targets import (
    draw_random_targets,
    load_targets,
    save_targets,
    targets_sha256,
)

__all__ = [
    "ATTACKS",
    "ATTACK_NAMES",
    "AttackInfo",
    "AttackOutcome",
    "AttackSpec",
    "attack",
    "attack_info",
    "draw_random_targets",
    "format_eps",
    "load_targets",
    "names_where",
    "parse_eps",
    "run_attack",
    "save_targets",
    "targets_sha256",
]
