"""BatchNorm folded into the convolution before it, for a model that only runs in eval mode.

In eval mode ``BatchNorm2d(Conv2d(x))`` is one affine map per output channel after the
convolution, so it folds into the convolution's weight and bias (Ioffe & Szegedy 2015, the
inference form): ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps)
+ beta``. The folded model computes the same function (float32 rounding apart: logits agree to
about 1e-6 relative on the digits models), and an attack pass through it skips every BatchNorm
forward and backward (docs/study.md has the measured saving).

Which pairs fold: a ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an
``nn.Sequential`` (how the toolkit's blocks, stems and projections are built,
``robustlr.models.blocks.conv_bn_relu``). Every other module stays as it is: a BatchNorm after a
local relation layer, or a model built some other way, runs unfolded.
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def foldable_pairs(model: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """(container, conv name, BatchNorm name) of every Conv2d directly followed by a
    BatchNorm2d of the same channel count inside an ``nn.Sequential`` of ``model``."""
    pairs = []
    for module in model.modules():
        if type(module) is not nn.Sequential:  # a subclass may run its children out of order
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, bn = module._modules[first], module._modules[second]
            if (
                type(conv) is nn.Conv2d
                and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats
                and bn.running_var is not None
                and bn.num_features == conv.out_channels
            ):
                pairs.append((module, first, second))
    return pairs


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution computing ``bn(conv(x))`` in eval mode."""
    scale = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    scale = scale / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = copy.deepcopy(conv)
    folded.bias = nn.Parameter(torch.empty_like(bn.running_mean))
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        folded.bias.copy_((bias - bn.running_mean) * scale + shift)
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable Conv2d + BatchNorm2d pair replaced by
    one convolution (the BatchNorm by ``nn.Identity``); ``model`` itself is left untouched. A
    model with no such pair (or a TorchScript module) is returned as it is, not copied.

    The copy is for evaluation only: its parameters are not the checkpoint's, and training it
    would not train the model.
    """
    if isinstance(model, torch.jit.ScriptModule) or not foldable_pairs(model):
        return model
    folded = copy.deepcopy(model).eval()
    pairs = foldable_pairs(folded)
    for container, conv_name, bn_name in pairs:
        conv, bn = container._modules[conv_name], container._modules[bn_name]
        container._modules[conv_name] = _folded_conv(conv, bn)
        container._modules[bn_name] = nn.Identity()
    log.debug("folded %d BatchNorm layers into their convolutions", len(pairs))
    return folded
