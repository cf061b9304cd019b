"""``AttackSpec``: one attack's full threat model, from CLI options or a suite file."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from robustlr.attacks.registry import ALL_NORMS, ATTACK_NAMES, ATTACKS, AttackInfo, attack_info

NORMS = ALL_NORMS
TARGET_POLICIES = ("none", "random", "least-likely")
PRECISIONS = ("fp32", "bf16", "fp16")
# spec options that only some attacks use (the registry's ``takes``); eps, norm, seed: all
OPTIONAL_OPTIONS = ("step_size", "steps", "restarts", "random_start", "precision", "queries")
DEFAULT_STEPS = 10
DEFAULT_QUERIES = 5000

# attack name -> the target policy it implies ("pgd" leaves the policy to the spec)
ATTACK_TARGETS: dict[str, str | None] = {name: ATTACKS[name].target for name in ATTACK_NAMES}


def _nonzero_text(text: str) -> bool:
    """Whether a number's text has a nonzero digit in its mantissa ("1e-400": yes)."""
    mantissa = text.lower().split("e", 1)[0]
    return any(c in "123456789" for c in mantissa)


def parse_number(value: str | float | int) -> float:
    """Read ``16/255``, ``0.0627`` or a number as a finite float. A nonzero number that rounds
    to 0 as a float (``1e-400``) is refused, never read as 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number such as 16/255 or 0.0627, got {value!r}")
    if isinstance(value, (int, float)):
        number, nonzero = float(value), value != 0
    else:
        text = value.strip()
        try:
            if "/" in text:
                numerator, denominator = text.split("/", 1)
                number = float(numerator) / float(denominator)
                nonzero = _nonzero_text(numerator)
            else:
                number, nonzero = float(text), _nonzero_text(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"cannot read {value!r} as a number such as 16/255 or 0.0627"
            ) from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    if number == 0 and nonzero:
        raise ValueError(f"{value!r} is too small: it rounds to 0")
    return number


def parse_eps(value: str | float | int, norm: str = "linf") -> float:
    """Parse an eps or step size (``16/255``, ``0.0627``, ``2``): L-inf within [0, 1] (images
    are on [0, 1]); L2 any radius >= 0 (its upper bound, the image's diameter, is checked
    against the images: :meth:`AttackSpec.check_images`)."""
    number = parse_number(value)
    if norm == "linf" and not 0.0 <= number <= 1.0:
        raise ValueError(f"{value!r} = {number:g} is outside [0, 1] (L-inf, images are on [0, 1])")
    if number < 0:
        raise ValueError(f"{value!r} is negative; a radius is >= 0")
    return number


def format_eps(value: float, norm: str = "linf") -> str:
    """Write an L-inf eps as k/255 when it is one, else (and any L2 radius) as a decimal."""
    k = value * 255
    if norm == "linf" and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{value:g}"


def image_diameter(shape: tuple[int, ...]) -> float:
    """The L2 diameter of [0, 1] images of ``shape`` (C, H, W): sqrt(C * H * W)."""
    return math.sqrt(math.prod(int(v) for v in shape))


@dataclass(frozen=True)
class AttackSpec:
    """A white-box (or black-box) attack and its threat model.

    ``target`` is the target policy: ``none`` (untargeted, on the true label), ``random`` (a
    random wrong class per image, drawn from ``seed``) or ``least-likely`` (the clean model's
    least likely class). ``restarts`` random starts are merged as the per-example worst case.

    ``step_size`` keeps what was given: None means "derived", 2.5 * eps / steps (Madry et al.;
    eps for FGSM), and ``resolved_step_size`` recomputes it from the current eps and steps, so
    a copy with another eps or step count never carries a stale step. Options the attack does
    not use (see ``robustlr.attacks.registry``) are refused when given.
    """

    name: str
    eps: float = 16 / 255
    norm: str | None = None  # default: the attack's first norm (registry ``norms``)
    step_size: float | None = None  # None: derived from eps and steps (resolved_step_size)
    steps: int = DEFAULT_STEPS
    restarts: int = 1
    target: str | None = None  # default: implied by the name
    random_start: bool = True
    seed: int = 0
    precision: str = "fp32"
    queries: int = DEFAULT_QUERIES  # square, hopskipjump (per image)

    def __post_init__(self) -> None:
        info = attack_info(self.name)
        target = self.target if self.target is not None else (info.target or "none")
        if target not in TARGET_POLICIES:
            raise ValueError(f"target policy must be one of {TARGET_POLICIES}, got {target!r}")
        if info.target is not None and target != info.target:
            raise ValueError(
                f"attack {self.name!r} implies target policy {info.target!r}, not {target!r}"
            )
        object.__setattr__(self, "target", target)
        if self.norm is None:
            object.__setattr__(self, "norm", info.norms[0])
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm not in info.norms:
            raise ValueError(
                f"attack {self.name!r} runs in norm {' or '.join(info.norms)}, not {self.norm!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for key in ("eps", "step_size"):  # "16/255" is accepted everywhere
            if isinstance(getattr(self, key), str):
                object.__setattr__(self, key, parse_number(getattr(self, key)))
        object.__setattr__(self, "eps", parse_eps(self.eps, self.norm))
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        self._refuse_unused(info)
        if self.step_size is not None:
            object.__setattr__(self, "step_size", parse_eps(self.step_size, self.norm))
        if info.family == "fgsm":
            object.__setattr__(self, "steps", 1)

    def _refuse_unused(self, info: AttackInfo) -> None:
        given = {
            "step_size": self.step_size is not None,
            "restarts": self.restarts != 1,
            "random_start": not self.random_start,
            "precision": self.precision != "fp32",
            "queries": self.queries != DEFAULT_QUERIES,
        }
        unused = [k for k, v in given.items() if v and k not in info.takes]
        if unused:
            what = ", ".join(k.replace("_", " ") for k in unused)
            runs = "in fp32 only" if unused == ["precision"] else f"without {what}"
            raise ValueError(f"attack {self.name!r} runs {runs}; do not set {what}")

    def check_images(self, shape: tuple[int, ...]) -> None:
        """ValueError when an L2 eps or step size exceeds the diameter of images of ``shape``
        (C, H, W): no two such images are farther apart."""
        if self.norm != "l2" or self.info.family == "clean":
            return
        diameter = image_diameter(shape)
        step = self.resolved_step_size
        for what, value in (("eps", self.eps), ("step size", step)):
            if value is not None and value > diameter:
                size = "x".join(str(int(v)) for v in shape)
                raise ValueError(
                    f"l2 {what} {value:g} exceeds the diameter {diameter:.4g} of {size} images "
                    "on [0, 1]"
                )

    @property
    def info(self) -> AttackInfo:
        """The attack's registry entry."""
        return ATTACKS[self.name]

    @property
    def targeted(self) -> bool:
        return self.target != "none"

    @property
    def resolved_step_size(self) -> float | None:
        """The step size the attack runs with (None for attacks without one): the given one,
        else eps for FGSM and 2.5 * eps / steps for PGD, from the current eps and steps."""
        if not self.info.takes_step_size:
            return None
        if self.step_size is not None:
            return self.step_size
        return self.eps if self.info.family == "fgsm" else 2.5 * self.eps / self.steps

    def with_options(self, **changes: Any) -> AttackSpec:
        """A copy with some fields changed. None values are ignored, and so are options this
        attack does not use (e.g. a step size for APGD), so one set of overrides fits a suite.
        A derived step size stays derived: it follows the new eps and steps."""
        kept = {
            k: v
            for k, v in changes.items()
            if v is not None and (k not in OPTIONAL_OPTIONS or k in self.info.takes)
        }
        return replace(self, **kept)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttackSpec:
        """Build from a suite entry; eps and step_size may be strings such as ``16/255``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown attack option(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        for key in ("eps", "step_size"):
            if isinstance(data.get(key), str):
                data[key] = parse_number(data[key])
        return cls(**data)

    @classmethod
    def example(cls, name: str) -> AttackSpec:
        """A small, cheap spec of attack ``name`` (the registry's ``example``)."""
        return cls(name, **attack_info(name).example)

    def describe(self) -> str:
        if self.info.family == "clean":
            return "clean"
        parts = [self.name, f"{self.norm} eps={format_eps(self.eps, self.norm)}"]
        step = self.resolved_step_size
        if step is not None:
            parts.append(f"step={format_eps(step, self.norm)}")
        if "steps" in self.info.takes:
            parts.append(f"steps={self.steps}")
        if self.restarts > 1:
            parts.append(f"restarts={self.restarts}")
        if "queries" in self.info.takes:
            parts.append(f"queries={self.queries}")
        if self.targeted:
            parts.append(f"target={self.target}")
        return " ".join(parts)
