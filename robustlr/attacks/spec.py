"""``AttackSpec``: one attack's full threat model, from CLI options or a suite file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

NORMS = ("linf", "l2")
TARGET_POLICIES = ("none", "random", "least-likely")
PRECISIONS = ("fp32", "bf16", "fp16")

# attack name -> the target policy it implies ("pgd" leaves the policy to the spec)
ATTACK_TARGETS: dict[str, str | None] = {
    "clean": "none",
    "fgsm": "none",
    "pgd": None,
    "pgd-untargeted": "none",
    "pgd-targeted": "random",
    "pgd-least-likely": "least-likely",
    "apgd-ce": "none",
    "apgd-t": "none",
    "fab": "none",
    "square": "none",
    "cw": "none",
    "autoattack": "none",
    "autoattack-plus": "none",
}
ATTACK_NAMES = tuple(ATTACK_TARGETS)


def parse_number(value: str | float | int) -> float:
    """Read ``16/255``, ``0.0627`` or a number as a float."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read {value!r} as a number such as 16/255 or 0.0627") from None


def parse_eps(value: str | float | int) -> float:
    """Parse an L-inf eps or step size (``16/255``, ``0.0627``); it must lie in [0, 1]."""
    number = parse_number(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{value!r} = {number:g} is outside [0, 1] (images are on [0, 1])")
    return number


def format_eps(value: float) -> str:
    """Write eps as k/255 when it is one, else as a decimal."""
    k = value * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{value:g}"


@dataclass(frozen=True)
class AttackSpec:
    """A white-box (or black-box) attack and its threat model.

    ``target`` is the target policy: ``none`` (untargeted, on the true label), ``random`` (a
    random wrong class per image, drawn from ``seed``) or ``least-likely`` (the clean model's
    least likely class). ``restarts`` random starts are merged as the per-example worst case.
    """

    name: str
    eps: float = 16 / 255
    norm: str = "linf"
    step_size: float | None = None  # default: 2.5 * eps / steps (Madry et al.)
    steps: int = 10
    restarts: int = 1
    target: str | None = None  # default: implied by the name
    random_start: bool = True
    seed: int = 0
    precision: str = "fp32"
    queries: int = 5000  # square

    def __post_init__(self) -> None:
        if self.name not in ATTACK_TARGETS:
            raise ValueError(f"unknown attack {self.name!r}; choose from {', '.join(ATTACK_NAMES)}")
        implied = ATTACK_TARGETS[self.name]
        target = self.target if self.target is not None else (implied or "none")
        if target not in TARGET_POLICIES:
            raise ValueError(f"target policy must be one of {TARGET_POLICIES}, got {target!r}")
        if implied is not None and target != implied:
            raise ValueError(
                f"attack {self.name!r} implies target policy {implied!r}, not {target!r}"
            )
        object.__setattr__(self, "target", target)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for key in ("eps", "step_size"):  # "16/255" is accepted everywhere
            if isinstance(getattr(self, key), str):
                object.__setattr__(self, key, parse_number(getattr(self, key)))
        if self.norm == "linf":
            object.__setattr__(self, "eps", parse_eps(self.eps))
        elif self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.step_size is not None and self.step_size < 0:
            raise ValueError(f"step size must be >= 0, got {self.step_size}")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")
        if self.name == "fgsm":
            object.__setattr__(self, "steps", 1)
        if self.step_size is None:
            default = self.eps if self.name == "fgsm" else 2.5 * self.eps / self.steps
            object.__setattr__(self, "step_size", default)
        elif self.norm == "linf":
            object.__setattr__(self, "step_size", parse_eps(self.step_size))

    @property
    def targeted(self) -> bool:
        return self.target != "none"

    def with_options(self, **changes: Any) -> AttackSpec:
        """A copy with some fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

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

    def describe(self) -> str:
        if self.name == "clean":
            return "clean"
        parts = [self.name, f"{self.norm} eps={format_eps(self.eps)}"]
        if self.name.startswith("pgd") or self.name == "fgsm":
            parts.append(f"step={format_eps(self.step_size)} steps={self.steps}")
        if self.restarts > 1:
            parts.append(f"restarts={self.restarts}")
        if self.targeted:
            parts.append(f"target={self.target}")
        return " ".join(parts)
