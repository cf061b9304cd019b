"""``LocalRelation2d``: the paper's local relation layer (Hu et al. 2019, Fig. 2; DESIGN.md §2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from robustlr.ops import COMPOSABILITIES, local_relation

GEOMETRIC_PRIORS = ("mlp", "direct", "none")
# How a geometric prior starts (docs/lrnet-training.md). The peaked inits start every group's
# logits at -s_g * (L1 distance in pixels to the group's peak), with per-group sharpness s_g
# spread log-uniformly over PRIOR_SHARPNESS, so that the window starts local rather than as a
# uniform average and the groups start different:
# - "shift" (the default) peaks the groups at the centre and the 8 pixels around it in turn
#   (SHIFT_PEAKS), so each group starts as a nearly pure shift of its channels and the 1x1 after
#   aggregation mixes shifted copies: the layer starts as a shift-and-mix convolution (Wu et al.,
#   "Shift: A Zero FLOP, Zero Parameter Alternative to Spatial Convolutions", 2018), which can
#   form edge detectors from the first step;
# - "centre" peaks every group at the window centre (groups differ only by sharpness: blurs);
# - "default" is PyTorch's default initialisation (near-uniform weights over the whole window,
#   the behaviour of robustlr 0.1).
PRIOR_INITS = ("shift", "centre", "default")
DEFAULT_PRIOR_INIT = "shift"
PRIOR_SHARPNESS = (1.0, 4.0)
SHIFT_PEAKS = ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))


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


def check_prior_init(init: str) -> None:
    """ValueError unless ``init`` is one of ``PRIOR_INITS``."""
    if init not in PRIOR_INITS:
        raise ValueError(f"prior_init must be one of {PRIOR_INITS}, got {init!r}")


def prior_sharpness(groups: int) -> torch.Tensor:
    """Per-group sharpness of the peaked prior inits: log-uniform over PRIOR_SHARPNESS.

    Shape: (G,).
    """
    low, high = (math.log(v) for v in PRIOR_SHARPNESS)
    if groups == 1:
        return torch.tensor([math.exp((low + high) / 2)])
    return torch.exp(torch.linspace(low, high, groups))


def prior_peaks(groups: int, kernel_size: int, init: str) -> list[tuple[int, int]]:
    """Each group's peak (dy, dx) in pixels from the window centre under a peaked ``init``."""
    if init != "shift" or kernel_size < 3:
        return [(0, 0)] * groups
    return [SHIFT_PEAKS[g % len(SHIFT_PEAKS)] for g in range(groups)]


def peaked_prior_logits(groups: int, kernel_size: int, init: str) -> torch.Tensor:
    """A peaked init's target: -s_g times the L1 distance (in pixels) to group g's peak.

    Shape: (G, K, K).
    """
    half = max(1, kernel_size // 2)
    positions = relative_positions(kernel_size) * half
    peaks = torch.tensor(prior_peaks(groups, kernel_size, init)).float().view(groups, 2, 1, 1)
    distance = (positions.unsqueeze(0) - peaks).abs().sum(1)
    return -prior_sharpness(groups).view(groups, 1, 1) * distance


class GeometricPrior(nn.Module):
    """The paper's small network on relative positions: 1x1 (2 -> hidden), ReLU, 1x1 (-> G).

    With a peaked ``init`` ("shift" or "centre") the first hidden units start as
    ReLU(+-(dy - a)) and ReLU(+-(dx - a)) for each peak coordinate a in use (pairs summing to
    |dy - a| and |dx - a|), and the output layer reads group g's four units with weight
    -s_g * K // 2, so the network starts exactly at :func:`peaked_prior_logits`; the other hidden
    units start with PyTorch's default weights and a zero output weight (they join as training
    moves the output layer).

    Shape: () -> (G, K, K) logits.
    """

    def __init__(
        self, groups: int, kernel_size: int, hidden: int = 32, init: str = DEFAULT_PRIOR_INIT
    ) -> None:
        super().__init__()
        check_prior_init(init)
        self.register_buffer("positions", relative_positions(kernel_size), persistent=False)
        self.net = nn.Sequential(
            nn.Conv2d(2, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, groups, 1)
        )
        if init != "default":
            self._init_peaked(groups, kernel_size, init)

    @torch.no_grad()
    def _init_peaked(self, groups: int, kernel_size: int, init: str) -> None:
        first, last = self.net[0], self.net[2]
        peaks = prior_peaks(groups, kernel_size, init)
        half = max(1, kernel_size // 2)
        units: dict[tuple[int, int, float], int] = {}  # (axis, peak coordinate, sign) -> unit
        for axis in (0, 1):
            for coordinate in sorted({peak[axis] for peak in peaks}):
                for sign in (1.0, -1.0):
                    units[(axis, coordinate, sign)] = len(units)
        if len(units) > first.out_channels:
            raise ValueError(
                f"the {init!r} prior init needs {len(units)} hidden units, got {first.out_channels}"
            )
        for (axis, coordinate, sign), unit in units.items():
            first.weight[unit].zero_()
            first.weight[unit, axis] = sign
            first.bias[unit] = -sign * coordinate / half
        last.weight.zero_()
        last.bias.zero_()
        sharpness = prior_sharpness(groups)
        for group, peak in enumerate(peaks):
            for axis in (0, 1):
                for sign in (1.0, -1.0):
                    last.weight[group, units[(axis, peak[axis], sign)], 0, 0] = (
                        -sharpness[group] * half
                    )

    def forward(self) -> torch.Tensor:
        return self.net(self.positions.unsqueeze(0)).squeeze(0)


class DirectGeometricPrior(nn.Module):
    """Geometric prior values learnt directly, one per group and offset (G* in Table 3).

    A peaked ``init`` starts at :func:`peaked_prior_logits`, "default" at zeros (uniform).

    Shape: () -> (G, K, K) logits.
    """

    def __init__(self, groups: int, kernel_size: int, init: str = DEFAULT_PRIOR_INIT) -> None:
        super().__init__()
        check_prior_init(init)
        start = (
            torch.zeros(groups, kernel_size, kernel_size)
            if init == "default"
            else peaked_prior_logits(groups, kernel_size, init)
        )
        self.logits = nn.Parameter(start)

    def forward(self) -> torch.Tensor:
        return self.logits


class LocalRelation2d(nn.Module):
    """Local relation layer: query/key projections, geometric prior, local aggregation, 1x1.

    ``channels`` in and out, ``m`` channels share one aggregation (G = ceil(C / m) groups), the
    query is taken at output positions (stride ``stride``), and the aggregated features pass a
    1x1 channel transformation C -> C. ``geometric_prior`` is "mlp" (the paper's default),
    "direct" (G*) or "none" (NG); ``prior_init`` how it starts (``PRIOR_INITS``); ``qk_dim`` > 1
    uses vector queries/keys (Table 4). The 1x1 after aggregation starts with He (fan-out)
    initialisation like every other channel transformation of the network; the query and key
    projections keep PyTorch's default (small logits, near-prior-only weights at the start).

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
        prior_init: str = DEFAULT_PRIOR_INIT,
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
            self.geometric_prior: nn.Module | None = GeometricPrior(
                self.groups, kernel_size, init=prior_init
            )
        elif geometric_prior == "direct":
            self.geometric_prior = DirectGeometricPrior(self.groups, kernel_size, init=prior_init)
        else:
            check_prior_init(prior_init)
            self.geometric_prior = None
        self.project = nn.Conv2d(channels, channels, 1, bias=False)
        nn.init.kaiming_normal_(self.project.weight, mode="fan_out", nonlinearity="relu")

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


def relation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The query and key projection weights of every :class:`LocalRelation2d` in ``model``.

    The appearance logits are quadratic in these weights (sqdiff), so the training engine gives
    them a smaller learning rate (``relation_lr_scale``; docs/lrnet-training.md).
    """
    return [
        weight
        for module in model.modules()
        if isinstance(module, LocalRelation2d)
        for weight in (module.query.weight, module.key.weight)
    ]
