"""``LocalRelation2d``: the paper's local relation layer (Hu et al. 2019, Fig. 2; DESIGN.md §2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from robustlr.ops import COMPOSABILITIES, local_relation

GEOMETRIC_PRIORS = ("mlp", "direct", "none")


def relative_positions(kernel_size: int) -> torch.Tensor:
    """The K x K grid of relative offsets (dy, dx), scaled to [-1, 1].

    Shape: (2, K, K).
    """
    if kernel_size == 1:
        return torch.zeros(2, 1, 1)
    half = kernel_size // 2
    axis = (torch.arange(kernel_size) - half).float() / half
    dy, dx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([dy, dx])


class GeometricPrior(nn.Module):
    """The paper's small network on relative positions: 1x1 (2 -> hidden), ReLU, 1x1 (-> G).

    Shape: () -> (G, K, K) logits.
    """

    def __init__(self, groups: int, kernel_size: int, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("positions", relative_positions(kernel_size), persistent=False)
        self.net = nn.Sequential(
            nn.Conv2d(2, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, groups, 1)
        )

    def forward(self) -> torch.Tensor:
        return self.net(self.positions.unsqueeze(0)).squeeze(0)


class DirectGeometricPrior(nn.Module):
    """Geometric prior values learnt directly, one per group and offset (G* in Table 3).

    Shape: () -> (G, K, K) logits.
    """

    def __init__(self, groups: int, kernel_size: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(groups, kernel_size, kernel_size))

    def forward(self) -> torch.Tensor:
        return self.logits


class LocalRelation2d(nn.Module):
    """Local relation layer: query/key projections, geometric prior, local aggregation, 1x1.

    ``channels`` in and out, ``m`` channels share one aggregation (G = ceil(C / m) groups), the
    query is taken at output positions (stride ``stride``), and the aggregated features pass a
    1x1 channel transformation C -> C. ``geometric_prior`` is "mlp" (the paper's default),
    "direct" (G*) or "none" (NG); ``qk_dim`` > 1 uses vector queries/keys (Table 4).

    Shape: (B, C, H, W) -> (B, C, (H - 1) // stride + 1, (W - 1) // stride + 1).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        m: int = 8,
        composability: str = "sqdiff",
        geometric_prior: str = "mlp",
        qk_dim: int = 1,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if composability not in COMPOSABILITIES:
            raise ValueError(
                f"composability must be one of {COMPOSABILITIES}, got {composability!r}"
            )
        if geometric_prior not in GEOMETRIC_PRIORS:
            raise ValueError(
                f"geometric_prior must be one of {GEOMETRIC_PRIORS}, got {geometric_prior!r}"
            )
        if m < 1 or channels < 1:
            raise ValueError(f"channels and m must be >= 1, got channels={channels}, m={m}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.m = m
        self.groups = math.ceil(channels / m)
        self.composability = composability
        self.qk_dim = qk_dim
        self.backend = backend
        self.query = nn.Conv2d(channels, self.groups * qk_dim, 1, bias=False)
        self.key = nn.Conv2d(channels, self.groups * qk_dim, 1, bias=False)
        if geometric_prior == "mlp":
            self.geometric_prior: nn.Module | None = GeometricPrior(self.groups, kernel_size)
        elif geometric_prior == "direct":
            self.geometric_prior = DirectGeometricPrior(self.groups, kernel_size)
        else:
            self.geometric_prior = None
        self.project = nn.Conv2d(channels, channels, 1, bias=False)

    def prior_logits(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The geometric-prior logits (zeros without a prior). Shape: (G, K, K)."""
        if self.geometric_prior is None:
            return torch.zeros(
                self.groups, self.kernel_size, self.kernel_size, dtype=dtype, device=device
            )
        return self.geometric_prior().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        q = self.query(x[:, :, ::s, ::s] if s > 1 else x).to(x.dtype)
        k = self.key(x).to(x.dtype)
        y = local_relation(
            x,
            q,
            k,
            self.prior_logits(x.dtype, x.device),
            kernel_size=self.kernel_size,
            stride=s,
            composability=self.composability,
            backend=self.backend,
            qk_dim=self.qk_dim,
        )
        return self.project(y)

    def extra_repr(self) -> str:
        prior = "none" if self.geometric_prior is None else type(self.geometric_prior).__name__
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, m={self.m}, "
            f"groups={self.groups}, composability={self.composability}, prior={prior}, "
            f"qk_dim={self.qk_dim}"
        )
