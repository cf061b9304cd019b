"""A naive local relation written straight from the formula, for tests only.

It loops over output positions, lists the in-image neighbours of each, and applies plain torch
ops (so autograd gives its exact gradients). It does not import robustlr.
"""

from __future__ import annotations

import math

import torch


def naive_local_relation(x, q, k, geo, kernel_size, stride, composability="sqdiff", qk_dim=1):
    """Naive local relation.

    Shape: x (B, C, H, W), q (B, G*D, Ho, Wo), k (B, G*D, H, W), geo (G, K, K) -> (B, C, Ho, Wo).
    """
    B, C, H, W = x.shape
    G = geo.shape[0]
    m = math.ceil(C / G)
    P = kernel_size // 2
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    group_of_channel = torch.tensor([c // m for c in range(C)])
    qd = q.reshape(B, G, qk_dim, Ho, Wo)
    kd = k.reshape(B, G, qk_dim, H, W)
    rows = []
    for i in range(Ho):
        cols = []
        for j in range(Wo):
            nbrs = [
                (a, b, i * stride - P + a, j * stride - P + b)
                for a in range(kernel_size)
                for b in range(kernel_size)
                if 0 <= i * stride - P + a < H and 0 <= j * stride - P + b < W
            ]
            logits = []
            for a, b, r, c in nbrs:
                qv, kv = qd[:, :, :, i, j], kd[:, :, :, r, c]
                if composability == "sqdiff":
                    phi = -((qv - kv) ** 2).sum(-1)
                elif composability == "absdiff":
                    phi = -(qv - kv).abs().sum(-1)
                else:
                    phi = (qv * kv).sum(-1)
                logits.append(phi + geo[:, a, b])  # (B, G)
            weights = torch.softmax(torch.stack(logits, -1), dim=-1)  # (B, G, n)
            values = torch.stack([x[:, :, r, c] for _, _, r, c in nbrs], -1)  # (B, C, n)
            cols.append((weights[:, group_of_channel] * values).sum(-1))  # (B, C)
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def random_inputs(B, C, H, W, G, kernel_size, stride, qk_dim=1, dtype=torch.float64, seed=0):
    """Random (x, q, k, geo) of the op's shapes, with logits of a useful spread."""
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    x = torch.randn(B, C, H, W, generator=gen, dtype=dtype)
    q = torch.randn(B, G * qk_dim, Ho, Wo, generator=gen, dtype=dtype)
    k = torch.randn(B, G * qk_dim, H, W, generator=gen, dtype=dtype)
    geo = torch.randn(G, kernel_size, kernel_size, generator=gen, dtype=dtype)
    return x, q, k, geo


def output_and_grads(fn, inputs, grad_out):
    """fn(*inputs) (detached) and the gradients of <fn(*inputs), grad_out> w.r.t. fresh copies
    of the inputs. Shape: inputs as the op's (x, q, k, geo); grad_out as its output."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*inputs)
    grads = torch.autograd.grad(y, inputs, grad_out)
    return y.detach(), grads


# The shape grid every backend is tested on: (B, C, H, W, G, K, stride).
SHAPES = [
    (2, 8, 6, 7, 2, 3, 1),
    (1, 5, 9, 8, 2, 5, 2),  # m = 3: the last group holds 2 channels
    (2, 3, 4, 5, 3, 7, 1),  # m = 1, image smaller than the window
    (1, 9, 10, 9, 3, 9, 3),
    (1, 16, 2, 3, 2, 9, 2),  # image much smaller than the window
    (2, 6, 7, 7, 6, 5, 3),  # m = 1
    (1, 100, 5, 6, 13, 7, 1),  # the paper's width 100 with m = 8: G = 13, last group 4
]
COMPOSABILITIES = ["sqdiff", "absdiff", "mul"]


def make_case(B, C, H, W, G, K, s, dtype=torch.float32, seed=0):
    x, q, k, geo = (t.to(dtype) for t in random_inputs(B, C, H, W, G, K, s, seed=seed))
    Ho, Wo = q.shape[-2:]
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(B, C, Ho, Wo, generator=gen, dtype=torch.float64).to(dtype)
    return x, q, k, geo, gy


def assert_close_rel(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, floor: float = 1e-6
) -> None:
    """Elementwise |a - e| <= tol * (|e| + max(max|e|, floor)).

    Relative, with a floor at the tensor's scale, and an absolute floor for tensors that are
    analytically zero (e.g. absdiff gradients where q lies beyond every key of its window),
    where rounding noise of 1e-17 must not fail the test.
    """
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(floor)
    err = ((actual - expected).abs() / (expected.abs() + scale)).max().item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"
