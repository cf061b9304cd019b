"""The local relation op's contract: argument checks and derived sizes, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPOSABILITIES = ("sqdiff", "absdiff", "mul")


@dataclass(frozen=True)
class LocalRelationShape:
    """Sizes of one local relation call (see DESIGN.md §1)."""

    batch: int
    channels: int
    height: int
    width: int
    groups: int
    channels_per_group: int
    out_height: int
    out_width: int
    kernel_size: int
    stride: int
    qk_dim: int

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    def sizes(self) -> tuple[int, ...]:
        """The extents the compiled kernels take, in their argument order:
        (B, C, H, W, G, m, Ho, Wo)."""
        return (
            self.batch,
            self.channels,
            self.height,
            self.width,
            self.groups,
            self.channels_per_group,
            self.out_height,
            self.out_width,
        )


def output_size(size: int, stride: int) -> int:
    """Output extent along one axis: ``(size - 1) // stride + 1`` (padding K // 2, K odd)."""
    return (size - 1) // stride + 1


def channels_per_group(channels: int, groups: int) -> int:
    """m = ceil(C / G), checking that G == ceil(C / m) so every group holds a channel."""
    m = -(-channels // groups)
    if -(-channels // m) != groups:
        raise ValueError(
            f"{groups} groups do not fit {channels} channels: with m = ceil(C / G) = {m} "
            f"channels per group only {-(-channels // m)} groups are used"
        )
    return m


def check_inputs(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    geo: torch.Tensor,
    kernel_size: int,
    stride: int,
    composability: str,
    qk_dim: int = 1,
) -> LocalRelationShape:
    """Validate the op's arguments and return its sizes; raise ValueError with a clear message.

    Shape:
        x (B, C, H, W), q (B, G*D, Ho, Wo), k (B, G*D, H, W), geo (G, K, K), D = qk_dim.
    """
    if composability not in COMPOSABILITIES:
        raise ValueError(f"composability must be one of {COMPOSABILITIES}, got {composability!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if qk_dim < 1:
        raise ValueError(f"qk_dim must be >= 1, got {qk_dim}")
    for name, t in (("x", x), ("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    if geo.dim() != 3:
        raise ValueError(f"geo must be 3-D (G, K, K), got shape {tuple(geo.shape)}")
    batch, channels, height, width = x.shape
    groups = geo.shape[0]
    if tuple(geo.shape[1:]) != (kernel_size, kernel_size):
        raise ValueError(f"geo must be (G, {kernel_size}, {kernel_size}), got {tuple(geo.shape)}")
    m = channels_per_group(channels, groups)
    out_h, out_w = output_size(height, stride), output_size(width, stride)
    if tuple(k.shape) != (batch, groups * qk_dim, height, width):
        raise ValueError(
            f"k must be (B, G*qk_dim, H, W) = {(batch, groups * qk_dim, height, width)}, "
            f"got {tuple(k.shape)}"
        )
    if tuple(q.shape) != (batch, groups * qk_dim, out_h, out_w):
        raise ValueError(
            f"q must be (B, G*qk_dim, Ho, Wo) = {(batch, groups * qk_dim, out_h, out_w)}, "
            f"got {tuple(q.shape)}"
        )
    devices = {t.device for t in (x, q, k, geo)}
    if len(devices) != 1:
        raise ValueError(f"x, q, k and geo must be on one device, got {sorted(map(str, devices))}")
    if not all(t.is_floating_point() for t in (x, q, k, geo)):
        raise ValueError("x, q, k and geo must be floating-point tensors")
    return LocalRelationShape(
        batch=batch,
        channels=channels,
        height=height,
        width=width,
        groups=groups,
        channels_per_group=m,
        out_height=out_h,
        out_width=out_w,
        kernel_size=kernel_size,
        stride=stride,
        qk_dim=qk_dim,
    )
