"""Adversarial training as a ``BatchHook``: the paper's targeted multi-step PGD (DESIGN.md §4).

Per batch of B images: a targeted PGD toward a random wrong class (or least-likely, or
untargeted) with BatchNorm in eval mode (folded into the convolutions) and frozen weights while
it runs; then the model trains on ``[clean part, adversarial part]`` concatenated (ALP's mixed
minibatch). ``mix`` is the share of clean images in the training batch: 0.5 trains on all B
clean images and their B adversarial versions (2B images, pairs aligned for logit pairing), 0 on
the adversarial images only (Xie et al.). ``logit_pairing`` adds lambda * mean squared
difference of the paired logits (Kannan et al.). ``clean_start_prob`` starts each image's
attack from the clean image with that probability instead of a uniform random point of the
ball.

Every random draw (targets, starts) comes from the step's generator, so a resumed run repeats
the attacks exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustlr.attacks.run import run_attack
from robustlr.attacks.spec import AttackSpec, format_eps
from robustlr.attacks.threat import threat_model
from robustlr.models.fold import fold_batchnorm
from robustlr.train.hooks import BatchHook, Criterion, HookedBatch, StepContext

if TYPE_CHECKING:
    from robustlr.train.config import TrainConfig

TRAIN_TARGETS = {
    "random": "pgd-targeted",
    "least-likely": "pgd-least-likely",
    "none": "pgd-untargeted",
}


@dataclass(frozen=True)
class AdversarialTraining:
    """The training threat model (defaults: the paper's, after Kannan et al.)."""

    eps: float = 16 / 255
    step_size: float = 2 / 255
    steps: int = 16
    target: str = "random"
    norm: str = "linf"
    random_start: bool = True
    mix: float = 0.5
    logit_pairing: float = 0.0
    clean_start_prob: float = 0.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.target not in TRAIN_TARGETS:
            raise ValueError(f"target must be one of {tuple(TRAIN_TARGETS)}, got {self.target!r}")
        if not 0.0 <= self.mix < 1.0:
            raise ValueError(f"mix (share of clean images) must be in [0, 1), got {self.mix}")
        if not 0.0 <= self.clean_start_prob <= 1.0:
            raise ValueError(f"clean_start_prob must be in [0, 1], got {self.clean_start_prob}")
        if self.logit_pairing < 0:
            raise ValueError(f"logit_pairing must be >= 0, got {self.logit_pairing}")
        if self.logit_pairing > 0 and self.mix == 0:
            raise ValueError("logit pairing needs clean images in the batch: use mix > 0")
        self.spec(0)  # validates eps, step size, steps, norm and precision

    def spec(self, seed: int) -> AttackSpec:
        return AttackSpec(
            TRAIN_TARGETS[self.target],
            eps=self.eps,
            norm=self.norm,
            step_size=self.step_size,
            steps=self.steps,
            random_start=self.random_start,
            seed=seed,
            precision=self.precision,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"PGD-{self.steps} {self.norm} eps={format_eps(self.eps, self.norm)} "
            f"step={format_eps(self.step_size, self.norm)} target={self.target} mix={self.mix}"
        )


@dataclass(frozen=True)
class AdversarialStep:
    """What one adversarial step made: ``n_clean`` clean images at the front of the training
    batch, then the adversarial ones; ``success`` per attacked image. Shape: success (B,)."""

    n_clean: int
    success: torch.Tensor


class AdversarialHook(BatchHook):
    """Replace each training batch by clean + adversarial images (see the module docstring).

    The hook holds only its settings: each step's results travel in the returned batch.
    """

    metric_names = ("clean_acc", "adv_acc", "attack_success")

    def __init__(self, settings: AdversarialTraining) -> None:
        self.settings = settings

    def transform(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> HookedBatch:
        """Shape: (B, C, H, W), (B,) -> (n_clean + B, C, H, W), (n_clean + B,)."""
        s = self.settings
        gen = ctx.generator
        on = gen.device  # draw on the generator's device (a CUDA generator fills CUDA tensors)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=on))
        spec = s.spec(seed)
        targets = None
        if s.target == "random":
            shift = torch.randint(1, ctx.num_classes, y.shape, generator=gen, device=on)
            targets = (y + shift.to(y.device)) % ctx.num_classes
        start = None
        if s.clean_start_prob > 0:
            ball = threat_model(s.norm, s.eps)
            keep_clean = torch.rand(len(x), generator=gen, device=on) < s.clean_start_prob
            random_point = ball.init(x, gen) if s.random_start else x
            start = torch.where(keep_clean.to(x.device).view(-1, 1, 1, 1), x, random_point)
        # the attack sees the model in eval mode with frozen weights: BatchNorm folded into the
        # convolutions is the same function, without BatchNorm passes (a copy per step)
        outcome = run_attack(fold_batchnorm(model), x, y, spec, targets=targets, start=start)
        n_clean = min(len(x), round(len(x) * s.mix / (1 - s.mix))) if s.mix > 0 else 0
        x_train = torch.cat([x[:n_clean], outcome.x_adv.to(x.dtype)])
        return HookedBatch(
            x_train,
            torch.cat([y[:n_clean], y]),
            AdversarialStep(n_clean, outcome.success.detach()),
        )

    def loss(
        self, logits: torch.Tensor, batch: HookedBatch, criterion: Criterion, ctx: StepContext
    ) -> torch.Tensor:
        """Cross-entropy over the mixed batch, plus logit pairing. Shape: (B', K) -> ()."""
        loss = criterion(logits, batch.y)
        n = batch.state.n_clean
        if self.settings.logit_pairing > 0 and n > 0:
            clean, adv = logits[:n].float(), logits[n : 2 * n].float()
            loss = loss + self.settings.logit_pairing * (clean - adv).square().sum(1).mean()
        return loss

    def metrics(
        self, logits: torch.Tensor, batch: HookedBatch, ctx: StepContext
    ) -> dict[str, tuple[torch.Tensor, int]]:
        step: AdversarialStep = batch.state
        correct = (logits.argmax(1) == batch.y).float()
        n = step.n_clean
        out = {
            "adv_acc": (correct[n:].sum(), len(correct) - n),
            "attack_success": (step.success.float().sum(), len(step.success)),
        }
        if n:
            out["clean_acc"] = (correct[:n].sum(), n)
        return out


def training_hook(config: TrainConfig) -> BatchHook:
    """The hook a run trains with, derived from its (saved) config: ``mode`` and
    ``adversarial`` alone decide it, whichever command starts or resumes the run."""
    if config.mode == "adversarial":
        return AdversarialHook(AdversarialTraining(**config.adversarial))
    return BatchHook()
