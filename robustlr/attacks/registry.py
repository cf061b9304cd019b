"""The attack registry: every attack name and its properties, declared once.

Everything that needs to know what an attack is (the spec's validation, how ``run_attack``
runs it, the torchattacks adapters, the result rows, the report's cells, checks and plots)
asks this table instead of matching names, so a new attack is added here and nowhere else.

Families:

* ``clean``: no attack (the model's own accuracy).
* ``pgd``: robustlr's own projected gradient descent (targeted, least-likely or untargeted).
* ``fgsm``: one signed-gradient step of size eps.
* ``apgd``: auto-PGD (Croce & Hein 2020), cross-entropy or targeted DLR loss (torchattacks).
* ``fab``, ``cw``: minimum-norm attacks (torchattacks); ``square``: black-box (torchattacks).
* ``ensemble``: AutoAttack, several attacks in turn, each on the images the previous missed.
* ``fmn``, ``ddn``: robustlr's own minimum-norm attacks (Pintor et al. 2021; Rony et al. 2019).
* ``decision``: HopSkipJump (Chen et al. 2020), robustlr's own decision-based attack.

Minimum-norm attacks (``min_norm``) find each image's smallest adversarial perturbation; the
spec's eps is only the radius their row reports accuracy at (the norms are in the outcomes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = (
    "clean",
    "pgd",
    "fgsm",
    "apgd",
    "fab",
    "square",
    "cw",
    "ensemble",
    "fmn",
    "ddn",
    "decision",
)
RUNNERS = ("clean", "pgd", "torchattacks", "minnorm")
ALL_NORMS = ("linf", "l2", "l1")
DEFAULT_NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackInfo:
    """What one attack is and how it runs.

    ``target``: the target policy the name implies (None: the spec chooses, as for ``pgd``).
    ``runner``: ``clean`` (no attack), ``pgd`` (robustlr's own loop), ``torchattacks`` or
    ``minnorm`` (robustlr's own minimum-norm attacks, ``robustlr.attacks.minnorm``).
    ``norms``: the norms it runs in; the first is the spec's default.
    ``min_norm``: it finds every image's smallest adversarial perturbation (the outcomes file
    holds the norms; the row reports accuracy at the spec's eps from them).
    ``takes``: the spec options this attack uses besides eps, norm and seed (``step_size``,
    ``steps``, ``restarts``, ``random_start``, ``precision``, ``queries``); an option outside it
    is refused when given to the spec and left out of its result row.
    ``white_box``: uses the model's gradients. ``bounded``: its examples lie in the eps ball by
    construction (an unbounded attack's examples outside the ball count as failures).
    ``batch_independent``: results do not depend on how images are batched (per-image seeds).
    ``reference``: the report column it fills beside Table 9 (a stronger reference attack).
    ``example``: a small, cheap spec of this attack (tests run every attack with it).
    """

    name: str
    family: str
    runner: str
    target: str | None = "none"
    takes: frozenset[str] = frozenset()
    white_box: bool = True
    bounded: bool = True
    batch_independent: bool = False
    reference: str | None = None
    norms: tuple[str, ...] = DEFAULT_NORMS
    min_norm: bool = False
    description: str = ""
    example: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"{self.name}: runner must be one of {RUNNERS}, got {self.runner!r}")

    @property
    def takes_step_size(self) -> bool:
        return "step_size" in self.takes

    @property
    def is_pgd(self) -> bool:
        """robustlr's own PGD (the Table 9 attack, and the subject of the step/eps checks)."""
        return self.family == "pgd"

    @property
    def reports_zero_gradients(self) -> bool:
        """Its rows carry a measured zero-gradient fraction (own gradient attacks)."""
        return self.runner == "pgd"


_PGD_OPTIONS = frozenset({"step_size", "steps", "restarts", "random_start", "precision"})
_SMALL_PGD = {"eps": 8 / 255, "steps": 2}
# ensembles run fixed settings; a large eps lets their first attack break every image, so the
# ensemble stops there (what is left is attacked by the next member only)
_SMALL_ENSEMBLE = {"eps": 0.5}

_ATTACKS = (
    AttackInfo(
        "clean",
        "clean",
        "clean",
        batch_independent=True,
        norms=ALL_NORMS,
        description="no attack: the model's clean accuracy",
    ),
    AttackInfo(
        "fgsm",
        "fgsm",
        "pgd",
        takes=frozenset({"step_size", "precision"}),
        batch_independent=True,
        description="one signed-gradient step (step size: eps)",
        example={"eps": 8 / 255},
    ),
    AttackInfo(
        "pgd",
        "pgd",
        "pgd",
        target=None,
        takes=_PGD_OPTIONS,
        batch_independent=True,
        description="PGD with the spec's target policy",
        example=_SMALL_PGD,
    ),
    AttackInfo(
        "pgd-untargeted",
        "pgd",
        "pgd",
        takes=_PGD_OPTIONS,
        batch_independent=True,
        description="PGD ascending the cross-entropy of the true label",
        example=_SMALL_PGD,
    ),
    AttackInfo(
        "pgd-targeted",
        "pgd",
        "pgd",
        target="random",
        takes=_PGD_OPTIONS,
        batch_independent=True,
        description="PGD toward a random wrong class per image (Kannan et al.)",
        example=_SMALL_PGD,
    ),
    AttackInfo(
        "pgd-least-likely",
        "pgd",
        "pgd",
        target="least-likely",
        takes=_PGD_OPTIONS,
        batch_independent=True,
        description="PGD toward the clean model's least likely class",
        example=_SMALL_PGD,
    ),
    AttackInfo(
        "apgd-ce",
        "apgd",
        "torchattacks",
        takes=frozenset({"steps", "restarts"}),
        reference="apgd_ce",
        description="auto-PGD on the cross-entropy (torchattacks APGD)",
        example={"eps": 8 / 255, "steps": 3},
    ),
    AttackInfo(
        "apgd-t",
        "apgd",
        "torchattacks",
        takes=frozenset({"steps", "restarts"}),
        description="auto-PGD on the targeted DLR loss, every wrong class (torchattacks APGDT)",
        example={"eps": 8 / 255, "steps": 3},
    ),
    AttackInfo(
        "fab",
        "fab",
        "torchattacks",
        takes=frozenset({"steps", "restarts"}),
        description="FAB minimum-norm attack, untargeted (torchattacks FAB)",
        example={"eps": 8 / 255, "steps": 3},
    ),
    AttackInfo(
        "square",
        "square",
        "torchattacks",
        takes=frozenset({"restarts", "queries"}),
        white_box=False,
        description="Square black-box attack (torchattacks Square)",
        example={"eps": 8 / 255, "queries": 20},
    ),
    AttackInfo(
        "cw",
        "cw",
        "torchattacks",
        takes=frozenset({"steps"}),
        bounded=False,
        norms=("l2",),
        description="Carlini-Wagner L2 (torchattacks CW, c=1, kappa=0, lr=0.01)",
        example={"eps": 1.0, "steps": 3},
    ),
    AttackInfo(
        "autoattack",
        "ensemble",
        "torchattacks",
        reference="autoattack",
        description="standard AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square "
        "with the original settings",
        example=_SMALL_ENSEMBLE,
    ),
    AttackInfo(
        "autoattack-fast",
        "ensemble",
        "torchattacks",
        description="torchattacks' AutoAttack(version='standard'): the standard ensemble with "
        "10-step APGD/APGD-T/FAB-T and Square's rescaled schedule (cheaper, weaker)",
        example=_SMALL_ENSEMBLE,
    ),
    AttackInfo(
        "autoattack-plus",
        "ensemble",
        "torchattacks",
        description="torchattacks' AutoAttack(version='plus'), 10-step attacks",
        example=_SMALL_ENSEMBLE,
    ),
    AttackInfo(
        "fmn",
        "fmn",
        "minnorm",
        takes=frozenset({"steps"}),
        batch_independent=True,
        norms=("linf", "l2", "l1"),
        min_norm=True,
        description="fast minimum-norm attack (Pintor et al. 2021), L-inf, L2 or L1",
        example={"eps": 8 / 255, "steps": 5},
    ),
    AttackInfo(
        "ddn",
        "ddn",
        "minnorm",
        takes=frozenset({"steps"}),
        batch_independent=True,
        norms=("l2",),
        min_norm=True,
        description="decoupled direction and norm attack (Rony et al. 2019), L2",
        example={"eps": 1.0, "steps": 5},
    ),
    AttackInfo(
        "hopskipjump",
        "decision",
        "minnorm",
        takes=frozenset({"queries"}),
        white_box=False,
        batch_independent=True,
        norms=("l2", "linf"),
        min_norm=True,
        description="HopSkipJump decision-based attack (Chen et al. 2020), L2 or L-inf; "
        "queries: the budget per image",
        example={"eps": 1.0, "queries": 80},
    ),
)

ATTACKS: dict[str, AttackInfo] = {a.name: a for a in _ATTACKS}
# names whose meaning changed: a result row with the old name and no ``attack_settings`` (rows
# written before the settings were recorded) ran what the new name means
RENAMED = {"autoattack": "autoattack-fast"}  # torchattacks' reduced ensemble, until issue 14
ATTACK_NAMES = tuple(ATTACKS)


def attack_info(name: str) -> AttackInfo:
    """The registry entry of ``name``; ValueError (one line) for an unknown attack."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(
            f"unknown attack {name!r}; choose from {', '.join(ATTACK_NAMES)}"
        ) from None


def names_where(**properties: Any) -> tuple[str, ...]:
    """Attack names whose properties (attributes of ``AttackInfo``) equal the given values,
    e.g. ``names_where(family="pgd")`` or ``names_where(white_box=False)``."""
    return tuple(
        a.name
        for a in _ATTACKS
        if all(getattr(a, key) == value for key, value in properties.items())
    )


def is_pgd(name: str) -> bool:
    """True for robustlr's own PGD attacks (False for unknown names, e.g. from old files)."""
    info = ATTACKS.get(name)
    return info is not None and info.is_pgd
