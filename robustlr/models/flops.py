"""Parameter and FLOP counts by forward hooks (1 multiply-add = 1 FLOP, the paper's convention).

Counted: Conv2d (every spatial conv and 1x1 channel transformation, including the LR layer's
query, key and output projections, by their own hooks), Linear, and the LR layer's own work:
``groups * qk_dim * K * K`` logits plus ``C * K * K`` aggregation multiply-adds per output
position. BatchNorm, ReLU, pooling, the softmax and the residual adds are not counted.
The geometric prior is input independent (a fixed G x K x K tensor at inference, Section 4)
and is not counted either; its parameters are.

The forward runs on the ``meta`` device (shapes only, no arithmetic, no memory), so counting
LR-Net-101 at 224x224 takes milliseconds. The local relation op itself does not run on meta
tensors, so while counting each LocalRelation2d's forward is swapped for a shape-only one that
calls the same query/key/projection convs and returns a tensor of the op's output shape.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from robustlr.nn import LocalRelation2d


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not), shared parameters counted once."""
    return sum(p.numel() for p in model.parameters())


def conv2d_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    """Multiply-adds of one image: output elements x (in / groups) x kh x kw."""
    kh, kw = module.kernel_size
    per_output = (module.in_channels // module.groups) * kh * kw
    return output[0].numel() * per_output


def linear_flops(module: nn.Linear, output: torch.Tensor) -> int:
    """Multiply-adds of one sample: out_features x in_features per output row."""
    return output[0].numel() * module.in_features


def local_relation_flops(module: LocalRelation2d, output: torch.Tensor) -> int:
    """The LR layer's logits (G * qk_dim * K * K) and aggregation (C * K * K) per output
    position of one image; its q/k/projection convs are counted by their own hooks."""
    _, height, width = output[0].shape
    kk = module.kernel_size * module.kernel_size
    return height * width * kk * (module.groups * module.qk_dim + module.channels)


def _shape_only_forward(self: LocalRelation2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward without the op: same convs, an output of the op's shape."""
    s = self.stride
    strided = x[:, :, ::s, ::s]
    self.query(strided)
    self.key(x)
    return self.project(strided)


@contextmanager
def _shape_only_local_relation(model: nn.Module) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, LocalRelation2d)]
    for layer in layers:
        layer.forward = types.MethodType(_shape_only_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def count_flops(model: nn.Module, input_size: int | tuple[int, int]) -> int:
    """Multiply-adds of one forward pass of one 3 x H x W image (FLOPs in the paper's sense).

    Runs on meta tensors; the model's own parameters, buffers and mode are left untouched.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, LocalRelation2d):
            total += local_relation_flops(module, output)
        elif isinstance(module, nn.Conv2d):
            total += conv2d_flops(module, output)
        elif isinstance(module, nn.Linear):
            total += linear_flops(module, output)

    counted = (nn.Conv2d, nn.Linear, LocalRelation2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    tensors = {name: t.to("meta") for name, t in model.named_parameters()}
    tensors.update({name: t.to("meta") for name, t in model.named_buffers()})
    was_training = model.training
    model.eval()
    try:
        with _shape_only_local_relation(model), torch.no_grad():
            x = torch.zeros(1, 3, height, width, device="meta")
            functional_call(model, tensors, (x,))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
