"""Threat models as init / step / project (the split of MadryLab's robustness library).

Every image lives on [0, 1]; ``project`` returns the nearest point of the eps ball around the
clean image that is also inside [0, 1] (for L-inf exactly; for L2 the ball projection is
followed by the box clip, which keeps the point inside both).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _per_example_norm(t: Tensor) -> Tensor:
    """L2 norm of each example, broadcastable to t. Shape: (B, ...) -> (B, 1, ..., 1)."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _draw(fn, shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> Tensor:
    """``fn`` (torch.rand / randn) drawn from ``generator`` on its own device (PyTorch refuses
    a generator of another device than the tensor it fills). Shape: -> shape."""
    return fn(shape, generator=generator, device=generator.device)


class LinfBall:
    """{x' : ||x' - x||_inf <= eps} ∩ [0, 1]^d."""

    name = "linf"

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Uniform random start in the ball, drawn on the generator's device (any device: the
        draw is moved to x's). Shape: like x."""
        noise = _draw(torch.rand, x.shape, generator).to(x.device, x.dtype)
        return self.project(x + (2 * noise - 1) * self.eps, x)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """Ascend the loss: x' + step * sign(grad). Shape: like x_adv."""
        return x_adv + step_size * grad.sign()

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp_(0.0, 1.0)


class L2Ball:
    """{x' : ||x' - x||_2 <= eps} ∩ [0, 1]^d."""

    name = "l2"

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random direction, radius uniform in [0, eps], drawn on the generator's device.
        Shape: like x."""
        direction = _draw(torch.randn, x.shape, generator).to(x.device, x.dtype)
        radius = _draw(torch.rand, (x.shape[0],), generator).to(x.device, x.dtype)
        direction = direction / _per_example_norm(direction)
        return self.project(x + direction * radius.view(-1, *([1] * (x.dim() - 1))) * self.eps, x)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """Ascend along the normalised gradient. Shape: like x_adv."""
        return x_adv + step_size * grad / _per_example_norm(grad)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        delta = x_adv - x
        scale = (self.eps / _per_example_norm(delta)).clamp(max=1.0)
        return (x + delta * scale).clamp_(0.0, 1.0)


def threat_model(norm: str, eps: float) -> LinfBall | L2Ball:
    """The ball of ``norm`` ('linf' or 'l2') and radius ``eps``."""
    if norm == "linf":
        return LinfBall(eps)
    if norm == "l2":
        return L2Ball(eps)
    raise ValueError(f"unknown norm {norm!r}; choose 'linf' or 'l2'")
