"""Residual blocks and the residual network body shared by ResNet and LR-Net.

The spatial layer of a block (3x3 conv for ResNet, 7x7 local relation for LR-Net) is passed in
as a factory ``spatial(in_channels, out_channels, stride) -> nn.Module``; everything else
(BatchNorm + ReLU after every layer, last BN before the residual add, ReLU after the add,
1x1 projection + BN shortcuts when the shape changes) is common.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from robustlr.nn import LocalRelation2d

SpatialFactory = Callable[[int, int, int], nn.Module]


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to an int, at least 1."""
    return max(1, round(channels * width))


def conv_bn_relu(layer: nn.Module, channels: int, relu: bool = True) -> nn.Sequential:
    """``layer`` followed by BatchNorm (and ReLU)."""
    parts = [layer, nn.BatchNorm2d(channels)]
    if relu:
        parts.append(nn.ReLU(inplace=True))
    return nn.Sequential(*parts)


def channel_transform(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 convolution without bias (the paper's "channel transformation")."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 projection + BatchNorm when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn_relu(channel_transform(in_channels, out_channels, stride), out_channels, False)


class BasicBlock(nn.Module):
    """ResNet basic block: spatial(in -> out, stride), spatial(out -> out), + shortcut.

    Shape: (B, in, H, W) -> (B, out, H / stride, W / stride).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, spatial: SpatialFactory
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn_relu(spatial(in_channels, out_channels, stride), out_channels),
            conv_bn_relu(spatial(out_channels, out_channels, 1), out_channels, relu=False),
        )
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.layers[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.layers(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """Bottleneck block: 1x1 (in -> inner), spatial(inner, stride), 1x1 (inner -> out), + shortcut.

    The stride sits on the spatial layer (the paper's A1, "ResNet v1.5").

    Shape: (B, in, H, W) -> (B, out, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        inner_channels: int,
        out_channels: int,
        stride: int,
        spatial: SpatialFactory,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn_relu(channel_transform(in_channels, inner_channels), inner_channels),
            conv_bn_relu(spatial(inner_channels, inner_channels, stride), inner_channels),
            conv_bn_relu(channel_transform(inner_channels, out_channels), out_channels, relu=False),
        )
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.layers[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.layers(x) + self.shortcut(x))


def make_stages(
    block: str,
    in_channels: int,
    depths: Sequence[int],
    inner_widths: Sequence[int],
    out_widths: Sequence[int],
    spatial: SpatialFactory,
) -> nn.Sequential:
    """Stages res2..res5: ``depths[i]`` blocks each, stride 2 in the first block of res3-res5.

    ``block`` is "basic" (inner widths unused) or "bottleneck".
    """
    stages = []
    for index, (depth, inner, out) in enumerate(zip(depths, inner_widths, out_widths, strict=True)):
        blocks: list[nn.Module] = []
        for j in range(depth):
            stride = 2 if index > 0 and j == 0 else 1
            if block == "basic":
                blocks.append(BasicBlock(in_channels, out, stride, spatial))
            elif block == "bottleneck":
                blocks.append(Bottleneck(in_channels, inner, out, stride, spatial))
            else:
                raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
            in_channels = out
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)


class ResidualNetwork(nn.Module):
    """normalize -> stem -> stages -> global average pool -> fc.

    Takes [0, 1] pixels (normalisation is the first layer).

    Shape: (B, 3, H, W) -> (B, num_classes).
    """

    def __init__(
        self,
        normalize: nn.Module,
        stem: nn.Module,
        stages: nn.Sequential,
        features: int,
        num_classes: int,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.stem = stem
        self.stages = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)
        self.num_classes = num_classes
        init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (B, 3, H, W) -> (B, features, H / 32, W / 32) (H, W with ``small_input``)."""
        return self.stages(self.stem(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """He (fan_out) init of the network's convs, BN to identity; LR layers keep their own init.

    ``zero_init_residual`` zeroes the last BN gamma of every residual block.
    """
    inside_lr = {
        id(sub)
        for module in model.modules()
        if isinstance(module, LocalRelation2d)
        for sub in module.modules()
    }
    for module in model.modules():
        if id(module) in inside_lr:
            continue
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_bn().weight)
