"""CUDA backend of the local relation op: CuPy RawKernels from ``kernels/local_relation.cu``.

Kernels are compiled with NVRTC once per (device index, dtype, K, stride) and cached; shapes
are kernel arguments. Launches run under a device guard on PyTorch's current stream of the
input's device, and every output is allocated by PyTorch (its caching allocator, its stream).

Inputs are made contiguous NCHW before the kernels run: channels_last or otherwise strided
tensors are copied (``Tensor.contiguous()``), which is the simplest correct approach; the
output is always contiguous NCHW. q and k are cast to x's dtype and geo to fp32 (it is tiny);
gradients come back in each input's own dtype. Tensors are handed to the kernels as raw device
pointers (which also works for bf16, which ``__cuda_array_interface__`` cannot describe).

Forward saves x, q, k, geo (the prepared copies) and a per-(b, g, i, j) fp32 log-sum-exp.
Backward runs two gather kernels, no atomics: ``lr_backward_query`` (grad q, D = sum gy * y, and
per-thread partial sums of grad geo, reduced afterwards by ``torch.sum``, so grad geo is
deterministic) and ``lr_backward_input`` (grad x and grad k).

CuPy is imported lazily, so importing this module works without CuPy or a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from robustlr.ops.contract import LocalRelationShape
from robustlr.ops.nvrtc import (
    COMPILE_OPTIONS,
    KERNEL_NAMES,
    KERNEL_SOURCE,
    load_kernel_source,
    name_expression,
)

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: Runtime composability codes of the kernels (LR_SQDIFF, LR_ABSDIFF, LR_MUL in lr_common.cuh).
COMPOSABILITY_CODES = {"sqdiff": 0, "absdiff": 1, "mul": 2}
#: Kernel storage type per supported torch dtype.
CTYPE_OF_DTYPE = {torch.float32: "float", torch.float16: "lr_half", torch.bfloat16: "lr_bf16"}

_BLOCK = 256
_MAX_BLOCKS = 1 << 20  # the kernels use grid-stride loops, so the grid may be capped
#: Threads of lr_backward_query, all groups together (fewer when there are fewer query
#: positions). Each thread leaves K * K fp32 partial sums of grad geo, so the buffer is at most
#: _QUERY_THREADS * K * K * 4 bytes (12.3 MiB for K = 7). A tuning knob for the GPU.
_QUERY_THREADS = 1 << 16


@dataclass(frozen=True)
class CupyKernels:
    """The three compiled kernels of one (device, dtype, K, stride)."""

    forward: Any
    backward_query: Any
    backward_input: Any


@functools.cache
def get_kernels(device_index: int, ctype: str, kernel_size: int, stride: int) -> CupyKernels:
    """Compile (first call) or fetch (later calls) the kernels for one device and configuration."""
    import cupy

    names = [name_expression(k, ctype, kernel_size, stride) for k in KERNEL_NAMES]
    log.debug("compiling %s on cuda:%d: %s", KERNEL_SOURCE, device_index, names)
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(
            code=load_kernel_source(KERNEL_SOURCE),
            options=COMPILE_OPTIONS,
            name_expressions=names,
        )
        functions = [module.get_function(name) for name in names]
        for fn in functions:  # load the module on this device now, not during a launch
            _ = fn.attributes
    return CupyKernels(*functions)


def _ptr(t: Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _launch(fn: Any, total: int, args: tuple) -> None:
    if total <= 0:
        return
    grid = min(math.ceil(total / _BLOCK), _MAX_BLOCKS)
    fn((grid,), (_BLOCK,), args)


@contextlib.contextmanager
def _launch_context(device: torch.device) -> Iterator[None]:
    """Device guard (torch and CuPy) with CuPy's current stream = torch's current stream."""
    import cupy

    index = device.index if device.index is not None else 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.cuda.device(index))
        stack.enter_context(cupy.cuda.Device(index))
        torch_stream = torch.cuda.current_stream(index)
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
            stream = cupy.cuda.Stream.from_external(torch_stream)  # CuPy >= 14
        else:
            stream = cupy.cuda.ExternalStream(torch_stream.cuda_stream, index)
        stack.enter_context(stream)
        yield


def _prepare(x: Tensor, q: Tensor, k: Tensor, geo: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contiguous NCHW x, q, k in x's dtype and a contiguous fp32 geo."""
    if x.dtype not in CTYPE_OF_DTYPE:
        raise TypeError(
            f"the 'cupy' local relation backend supports float32, float16 and bfloat16, got "
            f"{x.dtype}; use backend='reference' for float64 (e.g. for gradcheck)"
        )
    x = x.contiguous()
    q = q.to(x.dtype).contiguous()
    k = k.to(x.dtype).contiguous()
    geo = geo.to(torch.float32).contiguous()
    return x, q, k, geo


def _sizes(shape: LocalRelationShape) -> tuple:
    return tuple(
        _i64(v)
        for v in (
            shape.batch,
            shape.channels,
            shape.height,
            shape.width,
            shape.groups,
            shape.channels_per_group,
            shape.out_height,
            shape.out_width,
        )
    )


class _LocalRelationCupy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, geo, shape: LocalRelationShape, composability: str):
        dtypes = (q.dtype, k.dtype, geo.dtype)
        xc, qc, kc, geoc = _prepare(x, q, k, geo)
        B, C, G = shape.batch, shape.channels, shape.groups
        Ho, Wo = shape.out_height, shape.out_width
        y = torch.empty((B, C, Ho, Wo), dtype=xc.dtype, device=xc.device)
        lse = torch.empty((B, G, Ho, Wo), dtype=torch.float32, device=xc.device)
        comp = np.int32(COMPOSABILITY_CODES[composability])
        kernels = get_kernels(
            xc.device.index or 0, CTYPE_OF_DTYPE[xc.dtype], shape.kernel_size, shape.stride
        )
        with _launch_context(xc.device):
            _launch(
                kernels.forward,
                B * G * Ho * Wo,
                (*map(_ptr, (xc, qc, kc, geoc, y, lse)), *_sizes(shape), comp),
            )
        ctx.save_for_backward(xc, qc, kc, geoc, lse)
        ctx.shape = shape
        ctx.composability = composability
        ctx.input_dtypes = dtypes
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, q, k, geo, lse = ctx.saved_tensors
        shape: LocalRelationShape = ctx.shape
        q_dtype, k_dtype, geo_dtype = ctx.input_dtypes
        need_x, need_q, need_k, need_geo = ctx.needs_input_grad[:4]
        B, G, H, W = shape.batch, shape.groups, shape.height, shape.width
        Ho, Wo, K = shape.out_height, shape.out_width, shape.kernel_size
        gy = grad_y.to(x.dtype).contiguous()
        comp = np.int32(COMPOSABILITY_CODES[ctx.composability])
        kernels = get_kernels(x.device.index or 0, CTYPE_OF_DTYPE[x.dtype], K, shape.stride)
        sizes = _sizes(shape)

        gq = torch.empty_like(q)
        # D per output: written by lr_backward_query, read by lr_backward_input for grad k
        dsum = torch.zeros_like(lse)
        nchunks = max(1, min(B * Ho * Wo, math.ceil(_QUERY_THREADS / G)))
        geo_partial = torch.empty((G, K * K, nchunks), dtype=torch.float32, device=x.device)
        gx = torch.empty_like(x)
        gk = torch.empty_like(k)
        with _launch_context(x.device):
            if need_q or need_k or need_geo:
                _launch(
                    kernels.backward_query,
                    G * nchunks,
                    (
                        *map(_ptr, (x, q, k, geo, lse, gy, gq, dsum, geo_partial)),
                        *sizes,
                        _i64(nchunks),
                        comp,
                    ),
                )
            if need_x or need_k:
                _launch(
                    kernels.backward_input,
                    B * G * H * W,
                    (*map(_ptr, (x, q, k, geo, lse, dsum, gy, gx, gk)), *sizes, comp),
                )
        grad_x = gx if need_x else None
        grad_q = gq.to(q_dtype) if need_q else None
        grad_k = gk.to(k_dtype) if need_k else None
        grad_geo = geo_partial.sum(-1).view(G, K, K).to(geo_dtype) if need_geo else None
        return grad_x, grad_q, grad_k, grad_geo, None, None


def local_relation_cupy(
    x: Tensor, q: Tensor, k: Tensor, geo: Tensor, shape: LocalRelationShape, composability: str
) -> Tensor:
    """CuPy local relation (arguments already checked by ``contract.check_inputs``, qk_dim 1).

    Shape: x (B, C, H, W), q (B, G, Ho, Wo), k (B, G, H, W), geo (G, K, K) -> (B, C, Ho, Wo).
    """
    if shape.qk_dim != 1:
        raise ValueError("the 'cupy' backend supports qk_dim = 1 only")
    if x.device.type != "cuda":
        raise RuntimeError(f"the 'cupy' backend runs on CUDA tensors, got a {x.device} tensor")
    if x.dtype not in CTYPE_OF_DTYPE:
        raise TypeError(
            f"the 'cupy' local relation backend supports float32, float16 and bfloat16, got "
            f"{x.dtype}; use backend='reference' for float64 (e.g. for gradcheck)"
        )
    return _LocalRelationCupy.apply(x, q, k, geo, shape, composability)
