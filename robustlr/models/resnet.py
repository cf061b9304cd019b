"""ResNet-18/26/50/101 (He et al. 2016), the paper's baselines, on [0, 1] pixels."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from robustlr.models.blocks import (
    ResidualNetwork,
    conv_bn_relu,
    make_stages,
    scaled,
)
from robustlr.models.normalize import IMAGENET_MEAN, IMAGENET_STD, make_normalize
from robustlr.models.registry import register_model

STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4


def conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def resnet_stem(channels: int, small_input: bool) -> nn.Sequential:
    """7x7 conv stride 2 + BN + ReLU + 3x3 max pool stride 2; for small inputs a 3x3 conv,
    stride 1, and no pool (the usual CIFAR stem)."""
    if small_input:
        return conv_bn_relu(conv3x3(3, channels, 1), channels)
    conv = nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False)
    return nn.Sequential(*conv_bn_relu(conv, channels), nn.MaxPool2d(3, stride=2, padding=1))


def build_resnet(
    block: str,
    depths: Sequence[int],
    *,
    num_classes: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    small_input: bool,
    width: float,
    zero_init_residual: bool,
) -> ResidualNetwork:
    """A ResNet with ``block`` ("basic" or "bottleneck") and ``depths`` blocks per stage."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    inner = [scaled(c, width) for c in STAGE_WIDTHS]
    expansion = 1 if block == "basic" else BOTTLENECK_EXPANSION
    out = [scaled(c * expansion, width) for c in STAGE_WIDTHS]
    stem_channels = scaled(64, width)
    stages = make_stages(block, stem_channels, depths, inner, out, conv3x3)
    return ResidualNetwork(
        make_normalize(mean, std),
        resnet_stem(stem_channels, small_input),
        stages,
        out[-1],
        num_classes,
        zero_init_residual,
    )


@register_model
def resnet18(
    *,
    num_classes: int = 1000,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
) -> ResidualNetwork:
    """ResNet-18: basic blocks 2-2-2-2."""
    return build_resnet(
        "basic",
        (2, 2, 2, 2),
        num_classes=num_classes,
        mean=mean,
        std=std,
        small_input=small_input,
        width=width,
        zero_init_residual=zero_init_residual,
    )


@register_model
def resnet26(
    *,
    num_classes: int = 1000,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
) -> ResidualNetwork:
    """ResNet-26: bottleneck blocks 2-2-2-2 (the paper's ablation baseline)."""
    return build_resnet(
        "bottleneck",
        (2, 2, 2, 2),
        num_classes=num_classes,
        mean=mean,
        std=std,
        small_input=small_input,
        width=width,
        zero_init_residual=zero_init_residual,
    )


@register_model
def resnet50(
    *,
    num_classes: int = 1000,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
) -> ResidualNetwork:
    """ResNet-50: bottleneck blocks 3-4-6-3."""
    return build_resnet(
        "bottleneck",
        (3, 4, 6, 3),
        num_classes=num_classes,
        mean=mean,
        std=std,
        small_input=small_input,
        width=width,
        zero_init_residual=zero_init_residual,
    )


@register_model
def resnet101(
    *,
    num_classes: int = 1000,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
) -> ResidualNetwork:
    """ResNet-101: bottleneck blocks 3-4-23-3."""
    return build_resnet(
        "bottleneck",
        (3, 4, 23, 3),
        num_classes=num_classes,
        mean=mean,
        std=std,
        small_input=small_input,
        width=width,
        zero_init_residual=zero_init_residual,
    )
