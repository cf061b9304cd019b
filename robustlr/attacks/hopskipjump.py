"""HopSkipJump (Chen et al. 2020), L2 and L-inf: robustlr's own decision-based attack.

It sees only the model's decisions (is the prediction wrong?). Start: the first of up to
``INIT_TRIES`` uniform-noise images the model gets wrong, searched back to the decision
boundary (binary search on the segment to the clean image for L2, on the L-inf radius of
the clipped point for L-inf). Each iteration t then estimates the boundary's normal from the
decisions at ``INIT_EVALS * sqrt(t)`` random probes at radius delta around the boundary point
(a Monte-Carlo gradient with the mean decision as baseline), steps along it (L2: normalised;
L-inf: its sign) with a geometric search from dist / sqrt(t), and searches back to the boundary.
As in the paper (and its authors' code): theta = d^-3/2 (L2) or d^-2 (L-inf), every binary
search runs until its bracket is theta (times the distance for L-inf), and delta = sqrt(d) theta
dist (L2) or d theta dist (L-inf), both dist / d, so delta stays sqrt(d) (L2) or d (L-inf) times
the search tolerance (0.1 at the first iteration, as the authors' code). Every image has
its own query budget and its own generator keyed by (seed, image id): results do not depend on
the batch. An iteration starts only when the budget covers its worst case.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustlr.attacks.norms import l2_normalised, lp_norm, per_example
from robustlr.attacks.pgd import example_seed

Tensor = torch.Tensor

INIT_TRIES = 50  # uniform-noise images tried per image for a first adversarial point
INIT_EVALS = 100  # probes of the first gradient estimate (times sqrt(t) at iteration t)
MAX_EVALS = 1000  # at most this many probes per estimate
STEP_TRIES = 10  # halvings of the geometric step before the iteration stays put
FIRST_PROBE = 0.1  # probe radius of the first iteration (then dist / d)
CHUNK = 256  # images per forward pass (activations of 2048 cost the CPU 20% more)


def theta(norm: str, d: int) -> float:
    """The paper's binary-search tolerance for inputs of ``d`` dimensions."""
    return d**-1.5 if norm == "l2" else d**-2.0


def search_steps(norm: str, d: int) -> int:
    """Bisections that shrink a bracket of 1 (L2: the segment's fraction; L-inf: the radius,
    at most 1 on [0, 1] images, relative to the distance) to ``theta``."""
    return math.ceil(math.log2(1.0 / theta(norm, d)))


def settings(norm: str, queries: int, seed: int) -> str:
    """HopSkipJump's exact settings, for the result row's ``attack_settings``."""
    power = "3/2" if norm == "l2" else "2"
    return (
        f"HopSkipJump(norm={norm}, queries_per_image={queries}, init=uniform noise "
        f"<= {INIT_TRIES} tries + binary search, evals=min({INIT_EVALS}*sqrt(t), {MAX_EVALS}), "
        f"probe={FIRST_PROBE:g} then dist/d, step=geometric from dist/sqrt(t) "
        f"<= {STEP_TRIES} halvings, binary_search=to theta=d^-{power}, seed={seed} per image)"
    )


class Oracle:
    """The model's decisions (True: misclassified), counting queries per image."""

    def __init__(self, model: nn.Module, y: Tensor) -> None:
        self.model, self.y = model, y
        self.spent = torch.zeros(len(y), dtype=torch.long, device=y.device)

    @torch.no_grad()
    def wrong(self, points: Tensor, rows: Tensor) -> Tensor:
        """Shape: points (R, C, H, W) of the images ``rows`` (R,) -> (R,) bool."""
        preds = [self.model(part).argmax(1) for part in points.split(CHUNK)]
        self.spent += torch.bincount(rows, minlength=len(self.spent))
        return torch.cat(preds) != self.y[rows]


def _between(x: Tensor, far: Tensor, level: Tensor, norm: str) -> Tensor:
    """L2: the point ``level`` of the way from x to far; L-inf: far clipped to the L-inf ball
    of radius ``level`` around x. Shape: x, far (R, C, H, W), level (R,) -> like x."""
    a = per_example(level, x)
    if norm == "l2":
        return x + a * (far - x)
    return torch.min(torch.max(far, x - a), x + a)


def _to_boundary(
    oracle: Oracle, x: Tensor, far: Tensor, rows: Tensor, norm: str, steps: int
) -> Tensor:
    """Binary search (``steps`` bisections) from the adversarial points ``far`` towards x: the
    closest adversarial point found on the way. Shape: x, far (R, C, H, W), rows (R,) -> like x."""
    high = torch.ones(len(x), device=x.device) if norm == "l2" else lp_norm(far - x, "linf")
    low = torch.zeros_like(high)
    for _ in range(steps):
        mid = (low + high) / 2
        ok = oracle.wrong(_between(x, far, mid, norm), rows)
        high = torch.where(ok, mid, high)
        low = torch.where(ok, low, mid)
    return _between(x, far, high, norm)


def estimate_normal(
    oracle: Oracle, xb: Tensor, rows: Tensor, probe: Tensor, draws: Tensor
) -> Tensor:
    """Monte-Carlo estimate of the decision boundary's normal at the points ``xb`` (towards
    the adversarial side, unnormalised): the mean of the probe directions u weighted by the
    decision at xb + probe u (+1 wrong, -1 right) minus its mean over the probes (the
    baseline; none when every decision agrees). Shape: xb (R, C, H, W), rows (R,), probe (R,),
    draws (R, E, C, H, W) -> (R, C, H, W)."""
    evals, trailing = draws.shape[1], [1] * (draws.dim() - 2)
    u = l2_normalised(draws.flatten(0, 1)).view_as(draws)
    r = probe.view(-1, 1, *trailing)
    probes = (xb[:, None] + r * u).clamp(0, 1)
    u = (probes - xb[:, None]) / r
    decided = oracle.wrong(probes.flatten(0, 1), rows.repeat_interleave(evals))
    phi = decided.view(len(rows), evals).float() * 2 - 1
    mean = phi.mean(1, keepdim=True)
    centred = torch.where(mean.abs() == 1, phi, phi - mean)
    return (centred.view(*centred.shape, *trailing) * u).mean(1)


def _draw(generators: list[torch.Generator], rows: Tensor, shape, norm: str) -> Tensor:
    """Per image, from its own generator: Gaussian (L2) or uniform [-1, 1] (L-inf) draws.
    Shape: rows (R,) -> (R, *shape) on the CPU."""
    if norm == "l2":
        return torch.stack([torch.randn(shape, generator=generators[i]) for i in rows.tolist()])
    return torch.stack([2 * torch.rand(shape, generator=generators[i]) - 1 for i in rows.tolist()])


def hopskipjump(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str,
    queries: int,
    seed: int,
    example_ids: Tensor,
) -> tuple[Tensor, Tensor, int]:
    """HopSkipJump on a model in eval mode, at most ``queries`` decisions per image.

    Returns each image's smallest adversarial perturbation found, its ``norm`` (0: the clean
    image is already wrong; inf: none found) and the most queries one image spent.
    Shape: x (B, C, H, W) on [0, 1], y (B,), example_ids (B,) -> delta, norms (B,), int.
    """
    x = x.detach()
    n, shape, d = len(x), x.shape[1:], x[0].numel()
    searches = search_steps(norm, d)
    generators = [torch.Generator().manual_seed(example_seed(seed, 0, int(i))) for i in example_ids]
    oracle = Oracle(model, y)
    every = torch.arange(n, device=x.device)
    clean_wrong = oracle.wrong(x, every)
    best_norm = torch.where(clean_wrong, 0.0, float("inf")).to(x.device)
    boundary = x.clone()
    started = clean_wrong.clone()
    for _ in range(INIT_TRIES):
        rows = (~started & (oracle.spent < queries)).nonzero().squeeze(1)
        if not len(rows):
            break
        noise = torch.stack([torch.rand(shape, generator=generators[i]) for i in rows.tolist()]).to(
            x
        )
        ok = oracle.wrong(noise, rows)
        boundary[rows[ok]] = noise[ok]
        started[rows[ok]] = True
    fresh = (started & ~clean_wrong).nonzero().squeeze(1)
    budget_left = oracle.spent[fresh] + searches <= queries
    fresh = fresh[budget_left]
    if len(fresh):
        boundary[fresh] = _to_boundary(oracle, x[fresh], boundary[fresh], fresh, norm, searches)
    reached = torch.zeros(n, dtype=torch.bool, device=x.device)
    reached[fresh] = True
    best_norm = torch.where(reached, lp_norm(boundary - x, norm), best_norm)
    best_delta = torch.where(per_example(reached, x), boundary - x, 0.0)
    t = 0
    while True:
        t += 1
        evals = min(int(INIT_EVALS * math.sqrt(t)), MAX_EVALS)
        cost = evals + STEP_TRIES + searches
        rows = (reached & (oracle.spent + cost <= queries)).nonzero().squeeze(1)
        if not len(rows):
            break
        x0, xb = x[rows], boundary[rows]
        dist = lp_norm(xb - x0, norm)
        probe = torch.full_like(dist, FIRST_PROBE) if t == 1 else (dist / d).clamp_min(1e-6)
        draws = _draw(generators, rows, (evals, d), norm).view(len(rows), evals, *shape)
        grad = estimate_normal(oracle, xb, rows, probe, draws.to(x))
        direction = l2_normalised(grad) if norm == "l2" else grad.sign()
        eta = dist / math.sqrt(t)
        searching = torch.ones(len(rows), dtype=torch.bool, device=x.device)
        for _ in range(STEP_TRIES):
            idx = searching.nonzero().squeeze(1)
            if not len(idx):
                break
            step = per_example(eta[idx], xb[idx]) * direction[idx]
            ok = oracle.wrong((xb[idx] + step).clamp(0, 1), rows[idx])
            searching[idx[ok]] = False
            eta[idx[~ok]] /= 2
        far = torch.where(
            per_example(~searching, xb), (xb + per_example(eta, xb) * direction).clamp(0, 1), xb
        )
        boundary[rows] = _to_boundary(oracle, x0, far, rows, norm, searches)
        size = lp_norm(boundary[rows] - x0, norm)
        better = rows[size < best_norm[rows]]
        best_norm[better] = lp_norm(boundary[better] - x[better], norm)
        best_delta[better] = boundary[better] - x[better]
    return best_delta, best_norm, int(oracle.spent.max())
