"""Every attack of the registry bites: on a linear digits classifier (trained once per session,
``digits_model``) at a budget where a working attack must break it, accuracy falls far below
the clean accuracy, the attack's objective beats random noise of the same size, and targeted
attacks reach their targets, in every norm the attack declares (registry ``norms``); in every
other norm the attack's spec is refused.

Minimum-norm attacks (registry ``min_norm``) return each image's smallest adversarial
perturbation; their accuracy at eps comes from those norms (an image counts as broken when its
norm is <= eps, and only those images are moved), so the test also checks that the norms agree
with the images and are never below the exact minimum inside the box, which a linear model
allows to compute (``helpers.linear_min_norm_in_box``).

The cases come from the registry (``ATTACKS``), so an attack added there joins this test; its
spec is built from the options it ``takes``. An attack that cannot be held to this bar goes in
``EXEMPT`` with the reason, and the test then checks that the reason still holds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import linear_min_norm_in_box
from scipy.stats import binomtest

from robustlr.attacks import AttackSpec, run_attack
from robustlr.attacks.norms import lp_norm
from robustlr.attacks.registry import ALL_NORMS, ATTACK_NAMES, ATTACKS
from robustlr.attacks.spec import TARGET_POLICIES

# budgets at which a linear digits model (clean ~90%) must fall: every pixel moved by 0.3 of
# the [0, 1] range, an L2 change of 2 (an image's own L2 norm is ~4.5) or an L1 change of 3
# (three of the 64 pixels across the whole range; an image's own L1 norm is ~19). The exact
# smallest change inside the box that breaks the model is at most 0.18, 0.78 and 1.65.
BUDGET = {"linf": 0.3, "l2": 2.0, "l1": 3.0}
STEPS = 100  # cheap here (a linear model, 100 images) and enough for CW's lr of 0.01
QUERIES = 300
MAX_ADV_ACCURACY = 0.2
# the attack's objective beats same-size noise on more moved images than a coin would: a
# one-sided binomial test against 1/2 (a step that does nothing leaves a random start: ~1/2)
NOISE_P_VALUE = 1e-4
MIN_TARGET_HITS = 0.8

# attacks not held to the bar at all, with the reason (none today)
EXEMPT: dict[str, str] = {}


def _cases() -> list:
    """(attack, norm, target policy) for every attack in every norm (those it does not declare:
    to be refused); a name whose target policy is left to the spec (``pgd``) runs with each
    policy."""
    cases = []
    for name in ATTACK_NAMES:
        if name in EXEMPT:
            continue
        info = ATTACKS[name]
        policies = TARGET_POLICIES if info.target is None else (info.target,)
        cases += [
            pytest.param(name, norm, policy, id=f"{name}-{norm}-{policy}")
            for norm in ALL_NORMS
            for policy in policies
        ]
    return cases


def _spec(name: str, norm: str, policy: str) -> AttackSpec:
    takes = ATTACKS[name].takes
    options: dict[str, object] = {}
    if "steps" in takes:
        options["steps"] = STEPS
    if "queries" in takes:
        options["queries"] = QUERIES
    if ATTACKS[name].target is None:
        options["target"] = policy
    return AttackSpec(name, eps=BUDGET[norm], norm=norm, **options)


def _same_size_noise(x: torch.Tensor, delta: torch.Tensor, norm: str) -> torch.Tensor:
    """x plus random noise with each image's perturbation size in ``norm`` (L-inf: random signs
    of the largest change; L2, L1: a Gaussian direction scaled to the change's norm), clipped to
    [0, 1]. Shape: like x."""
    gen = torch.Generator().manual_seed(0)
    flat = delta.flatten(1)
    if norm == "linf":
        noise = torch.randint(0, 2, flat.shape, generator=gen).float() * 2 - 1
    else:
        noise = torch.randn(flat.shape, generator=gen)
        noise = noise / lp_norm(noise, norm)[:, None]
    return (x + (noise * lp_norm(flat, norm)[:, None]).view_as(x)).clamp(0, 1)


def _objective(model, x, labels, targeted: bool) -> torch.Tensor:
    with torch.no_grad():
        ce = F.cross_entropy(model(x), labels, reduction="none")
    return -ce if targeted else ce


def test_every_attack_is_covered_or_exempt_with_a_reason():
    named = {case.values[0] for case in _cases()} | set(EXEMPT)
    assert named == set(ATTACK_NAMES)
    assert set(EXEMPT) <= set(ATTACK_NAMES) and all(EXEMPT.values())


@pytest.mark.parametrize(("name", "norm", "policy"), _cases())
def test_attack_bites(digits_model, name, norm, policy):
    model, x, y = digits_model
    if norm not in ATTACKS[name].norms:
        with pytest.raises(ValueError, match="runs in norm"):
            _spec(name, norm, policy)
        return
    spec = _spec(name, norm, policy)
    outcome = run_attack(model, x, y, spec)
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
        adv_pred = model(outcome.x_adv).argmax(1)
    clean_acc = float((clean_pred == y).float().mean())
    adv_acc = float((adv_pred == y).float().mean())
    assert clean_acc > 0.8, "the session's digits model did not train"
    if spec.info.family == "clean":  # no attack: the clean images and the clean accuracy
        assert torch.equal(outcome.x_adv, x) and adv_acc == clean_acc
        return
    delta = outcome.x_adv - x
    size = lp_norm(delta, norm)
    assert float(size.max()) <= spec.eps * (1 + 1e-4) + 1e-6, "left the eps ball"
    if spec.info.min_norm:  # the row's accuracy at eps comes from the norms
        _check_norms(model, x, y, outcome.norms, size, adv_pred, spec)
    assert adv_acc <= MAX_ADV_ACCURACY, f"{spec.describe()}: {adv_acc:.0%} vs clean {clean_acc:.0%}"
    # the attack's own objective beats random noise of the same size, image by image
    labels = outcome.targets if spec.targeted else y
    moved = size > 0
    assert int(moved.sum()) >= len(x) // 2, "the attack left most images unchanged"
    attacked = _objective(model, outcome.x_adv, labels, spec.targeted)[moved]
    noisy = _objective(model, _same_size_noise(x, delta, norm), labels, spec.targeted)[moved]
    beats, n = int((attacked > noisy).sum()), len(attacked)
    p_value = binomtest(beats, n, 0.5, alternative="greater").pvalue
    assert p_value < NOISE_P_VALUE, f"{spec.describe()}: beats same-size noise on {beats}/{n}"
    if spec.targeted:
        assert outcome.targets is not None and not bool((outcome.targets == y).any())
        hits = float((adv_pred == outcome.targets).float().mean())
        assert hits >= MIN_TARGET_HITS, f"{spec.describe()}: {hits:.0%} reach their target"


def _check_norms(model, x, y, norms, size, adv_pred, spec) -> None:
    """A minimum-norm attack's norms: an image is wrong at eps exactly where its norm is <=
    eps, its image moved by that norm (the clamp to [0, 1] may only shorten it), and no norm
    is below the exact smallest change inside the box that breaks the linear model."""
    broken = norms <= spec.eps
    assert torch.equal(broken, adv_pred != y), f"{spec.describe()}: norms disagree with images"
    assert (size[broken] <= norms[broken] * (1 + 1e-4) + 1e-6).all()
    with torch.no_grad():
        right = model(x).argmax(1) == y
    exact = linear_min_norm_in_box(model, x, spec.norm)
    assert (norms[right] >= exact[right] * (1 - 1e-3)).all(), f"{spec.describe()}: below minimum"
