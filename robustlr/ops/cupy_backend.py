"""CUDA backend of the local relation op: CuPy RawKernels from ``kernels/local_relation.cu``.

Kernels are compiled with NVRTC once per (device index, dtype, K, stride) and cached; shapes
are kernel arguments. Launches run under a device guard on PyTorch's current stream of the
input's device, and every output is allocated by PyTorch (its caching allocator, its stream).

Inputs are made contiguous NCHW before the kernels run: channels_last or otherwise strided
tensors are copied (``Tensor.contiguous()``), which is the simplest correct approach; the
output is always contiguous NCHW. q and k are cast to x's dtype and geo to fp32 (it is tiny);
gradients come back in each input's own dtype. Tensors are handed to the kernels as raw device
pointers (which also works for bf16, which ``__cuda_array_interface__`` cannot describe).

Forward saves x, q, k, geo (the prepared copies), its output y and a per-(b, g, i, j) fp32
log-sum-exp. Backward runs two gather kernels, no atomics: ``lr_backward_query`` (grad q,
one partial of grad k per output tile (``key_partials``) and one partial sum of grad geo per
block, reduced afterwards by ``torch.sum``, so grad geo is deterministic for a given GPU; its grid
is sized from the device's SM count, ``query_chunks``) and ``lr_backward_input`` (grad x, and
grad k summed from the tile partials in a fixed order).

The launch seam: the autograd Function plans every launch with pure functions of the shape
(``plan_forward``, ``query_chunks``, ``plan_backward_query``, ``plan_backward_input``) and hands
each ``LaunchConfig`` with its arguments (tensors and numpy scalars, in the kernel's order) to a
``Launcher``. ``CupyLauncher`` packs them as CuPy does (``pack_arg``) and launches the NVRTC
build; the tests pass a host launcher (tests/host_shim) that checks every launch against the
kernel's C signature and runs the same kernels on the CPU through a CUDA execution emulator.

The automatic backend probes once per (device, dtype) (``kernels_usable``) and falls back to the
reference backend with one warning line when the kernels cannot be built.

CuPy is imported lazily, so importing this module works without CuPy or a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

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

#: Block shape (x, y) of every launch: one tile of LR_TILE_W x LR_TILE_H positions
#: (kernels/lr_common.cuh defines the same; a test checks that they agree).
TILE = (16, 8)
#: Largest grid.x of a launch; the kernels loop over tiles, so the grid may be capped.
MAX_BLOCKS = (1 << 31) - 1
#: Resident threads per SM that the backward-query grid aims for (2048 on sm_80 and sm_90).
THREADS_PER_SM = 2048
#: Shared memory per SM (sm_90; sm_80 has 164 KB) and what each resident block reserves besides
#: its own: how many blocks of lr_backward_query_packed an SM holds at once (its grid's aim).
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED = 1024
#: Static shared memory one block may declare (CUDA's limit without an opt-in attribute).
MAX_STATIC_SHARED = 48 * 1024
#: Shared memory (static + dynamic) a launch may ask for, opting in above 48 KB
#: (``max_dynamic_shared_size_bytes``): two resident blocks per SM on sm_80 (164 KB per SM, 1 KB
#: per block reserved), within the opt-in limit of every GPU with cp.async (99 KB on sm_86 and
#: sm_89, 163 KB on sm_80, 227 KB on sm_90).
MAX_OPTIN_SHARED = 80 * 1024
#: Images per block of lr_forward_packed (LR_SLOTS), each in a slot of SLOT_WIDTH output columns
#: (LR_SLOT_W) and two thread rows.
SLOTS = 8
SLOT_WIDTH = 8
#: Images per block of lr_forward_pairs and lr_backward_input_pairs (LR_PAIR_SLOTS), each in a
#: slot of a tile's TILE[0] columns and TILE[1] // PAIR_SLOTS thread rows (two warps); of
#: lr_backward_query_pairs, each in a slot of a whole tile run in two passes (a warp holds a
#: thread row of each slot).
PAIR_SLOTS = 2
#: Passes of lr_backward_query_pairs over a tile (``lr_query_pairs_shape::PASSES``): four thread
#: rows of each slot a pass.
QUERY_PAIR_PASSES = 2
#: The kernels with PAIR_SLOTS images per block.
PAIR_KERNELS = ("lr_forward_pairs", "lr_backward_query_pairs", "lr_backward_input_pairs")
#: The kernels for small images, several per block, their tiles in dynamic shared memory.
PACKED_KERNELS = (
    "lr_forward_pairs",
    "lr_forward_packed",
    "lr_backward_query_pairs",
    "lr_backward_query_packed",
    "lr_backward_input_pairs",
    "lr_backward_input_packed",
)
#: The kernels launched at stride 1 only (their bodies at other strides are empty).
STRIDE_ONE_KERNELS = (
    "lr_backward_query_pairs",
    "lr_backward_input_pairs",
    "lr_backward_input_packed",
)
#: Images per block of lr_backward_query_packed (LR_SLOTS / 2: slots of four thread rows).
QUERY_SLOTS = 4
#: Largest window of the kernels: the one the emulator tests cover against the float64 loop
#: (lr_backward_query's row reduction allows K <= 16; docs/gpu-kernels.md).
MAX_KERNEL_SIZE = 13


#: Most channels of a group the kernels stage in shared memory at once (LR_MAX_CHUNK).
MAX_CHANNEL_CHUNK = 8
#: Pitch of lr_backward_query's per-offset dlogit buffer (LR_RED_PITCH).
RED_PITCH = TILE[0] * TILE[1] + 8
#: Floats of static shared memory one block may declare.
_SHARED_FLOATS = MAX_STATIC_SHARED // 4
#: Strip heights (positions per thread) the backward-query kernel tries, tallest first.
QUERY_STRIPS = (2, 1)


def phase_cols(cols: int, stride: int) -> int:
    """Columns of one phase of a phase-ordered shared row (``lr_phase_cols``)."""
    return -(-cols // stride)


def padded_pitch(minimum: int, step: int) -> int:
    """``lr_padded_pitch``: the smallest pitch >= minimum with step * pitch = 16 (mod 32), so
    that two half-warps reading 16 consecutive words each, ``step`` rows apart, touch 32
    distinct banks; ``minimum`` when there is none."""
    for extra in range(32):
        if step * (minimum + extra) % 32 == 16:
            return minimum + extra
    return minimum


def shared_pitch(cols: int, stride: int, step: int) -> int:
    """Row pitch (floats) of a phase-ordered shared tile ``cols`` wide read at ``stride`` by
    half-warps ``step`` input rows apart (``lr_pitch`` in lr_common.cuh)."""
    return padded_pitch(stride * phase_cols(cols, stride), step)


def phase_col(col: int, cols: int, stride: int) -> int:
    """Position of column ``col`` in a phase-ordered row (``lr_phase_col``)."""
    return (col % stride) * phase_cols(cols, stride) + col // stride


def slot_pitch(minimum: int, step: int) -> int:
    """``lr_slot_pitch``: the smallest pitch >= minimum with step * pitch = 8, 16 or 24
    (mod 32); ``minimum`` when there is none."""
    for extra in range(32):
        if step * (minimum + extra) % 32 in (8, 16, 24):
            return minimum + extra
    return minimum


def slot_floats(floats: int, row_phase: int) -> int:
    """``lr_slot_floats``: the smallest slot size >= floats that is 16 modulo 32 words (8 where
    the rows' phase ``row_phase`` is 16), so that a warp's two slots fall in distinct banks."""
    want = 8 if row_phase == 16 else 16
    for extra in range(32):
        if (floats + extra) % 32 == want:
            return floats + extra
    return floats


@dataclass(frozen=True)
class PackedShape:
    """The geometry of a packed kernel (``lr_forward_shape<K, S, LR_SLOTS>``,
    ``lr_query_packed_shape<K, S>``, ``lr_input_shape<K, 1, LR_SLOTS>``): slots of ``slot_rows`` x
    SLOT_WIDTH positions (outputs; inputs in lr_backward_input_packed) in strips of ``strip``,
    each staging ``rows`` x ``cols`` positions at ``pitch``, ``slot`` floats apart;
    lr_backward_query_packed's key-gradient copies of ``copy`` floats; ``floats`` of dynamic
    shared memory in all; the loader copies the image positions of a ``box_rows`` x
    ``box_cols`` box per slot."""

    strip: int
    slot_rows: int
    rows: int
    cols: int
    pitch: int
    slot: int
    floats: int
    box_rows: int
    box_cols: int
    copy: int = 0


def _packed(
    kernel_size: int, stride: int, strip: int, slot_rows: int, rows: int, cols: int
) -> PackedShape:
    """A packed kernel's slot layout (``lr_slot_pitch``, ``lr_slot_floats``) and image box, its
    floats not yet counted."""
    K, S = kernel_size, stride
    pitch = slot_pitch(S * phase_cols(cols, S), strip * S)
    slot = slot_floats(rows * pitch, strip * S * pitch % 32)
    box_rows, box_cols = min(slot_rows * S, rows - K // 2), min(SLOT_WIDTH * S, cols - K // 2)
    return PackedShape(strip, slot_rows, rows, cols, pitch, slot, 0, box_rows, box_cols)


def packed_shape(kernel_size: int, stride: int) -> PackedShape:
    """The geometry of lr_forward_packed at (K, stride): SLOTS slots of two strips."""
    K, S = kernel_size, stride
    R = forward_strip(K, S)
    shape = _packed(K, S, R, 2 * R, (2 * R - 1) * S + K, (SLOT_WIDTH - 1) * S + K)
    floats = (MAX_CHANNEL_CHUNK + 1) * SLOTS * shape.slot + _forward_geo(K)
    return replace(shape, floats=floats)


def pairs_shape(kernel_size: int, stride: int) -> PackedShape:
    """The geometry of lr_forward_pairs at (K, stride) (``lr_forward_shape<K, S,
    LR_PAIR_SLOTS>``): PAIR_SLOTS slots of TILE[0] columns and four strips, each its staged rows
    at the tile's pitch (``shared_pitch``; the slots lie in different warps)."""
    K, S = kernel_size, stride
    R = forward_strip(K, S)
    slot_rows = TILE[1] // PAIR_SLOTS * R
    rows, cols = (slot_rows - 1) * S + K, (TILE[0] - 1) * S + K
    pitch = shared_pitch(cols, S, R * S)
    box_rows, box_cols = min(slot_rows * S, rows - K // 2), min(TILE[0] * S, cols - K // 2)
    floats = (MAX_CHANNEL_CHUNK + 1) * PAIR_SLOTS * rows * pitch + _forward_geo(K)
    return PackedShape(R, slot_rows, rows, cols, pitch, rows * pitch, floats, box_rows, box_cols)


def packed_query_shape(kernel_size: int, stride: int) -> PackedShape:
    """The geometry of lr_backward_query_packed at (K, stride): QUERY_SLOTS slots of four
    strips, a key-gradient copy per thread row and slot column (8 modulo 32 floats apart)."""
    K, S = kernel_size, stride
    R = query_strip(K, S)
    shape = _packed(K, S, R, 4 * R, (4 * R - 1) * S + K, (SLOT_WIDTH - 1) * S + K)
    reads = ((R - 1) * S + K) * shape.pitch  # a strip's staged rows
    copy = reads + (40 - reads % 32) % 32
    floats = (MAX_CHANNEL_CHUNK + 1) * QUERY_SLOTS * shape.slot + 2 * TILE[1] * copy
    floats += 2 * K * K + K * RED_PITCH + K * 8
    return replace(shape, floats=floats, copy=copy)


def pairs_query_shape(kernel_size: int, stride: int) -> PackedShape:
    """The geometry of lr_backward_query_pairs at (K, stride) (``lr_query_pairs_shape<K, S>``):
    PAIR_SLOTS slots of a whole tile of lr_backward_query (TILE[0] columns, TILE[1] strips),
    each its staged rows at the tile's pitch (``shared_pitch``), 16 modulo 32 floats apart, a
    key-gradient copy per thread row and slot (``key_grad_pitch``, 16 modulo 32)."""
    K, S = kernel_size, stride
    R = query_strip(K, S)
    slot_rows = TILE[1] * R
    rows, cols = (slot_rows - 1) * S + K, (TILE[0] - 1) * S + K
    pitch = shared_pitch(cols, S, R * S)
    slot = padded_pitch(rows * pitch, 1)
    copy = key_grad_pitch(K, S, R)
    box_rows, box_cols = min(slot_rows * S, rows - K // 2), min(TILE[0] * S, cols - K // 2)
    floats = (MAX_CHANNEL_CHUNK + 1) * PAIR_SLOTS * slot + 2 * TILE[1] * copy
    floats += 2 * K * K + K * RED_PITCH + K * 8
    return PackedShape(R, slot_rows, rows, cols, pitch, slot, floats, box_rows, box_cols, copy)


def pairs_query_bytes(kernel_size: int, stride: int) -> int:
    """Bytes of dynamic shared memory of lr_backward_query_pairs at (K, stride)."""
    return 4 * pairs_query_shape(kernel_size, stride).floats


def packed_input_shape(kernel_size: int) -> PackedShape:
    """The geometry of lr_backward_input_packed at (K, stride 1): SLOTS slots of two strips of
    inputs, each staging the outputs that cover it."""
    K = kernel_size
    R = input_strip(K, 1)
    shape = _packed(K, 1, R, 2 * R, 2 * R - 1 + K, SLOT_WIDTH - 1 + K)
    floats = (2 + MAX_CHANNEL_CHUNK) * SLOTS * shape.slot + K * K
    return replace(shape, floats=floats)


def pairs_shared_bytes(kernel_size: int, stride: int) -> int:
    """Bytes of dynamic shared memory of lr_forward_pairs at (K, stride)."""
    return 4 * pairs_shape(kernel_size, stride).floats


def pairs_input_shape(kernel_size: int) -> PackedShape:
    """The geometry of lr_backward_input_pairs at (K, stride 1) (``lr_input_shape<K, 1,
    LR_PAIR_SLOTS>``): PAIR_SLOTS slots of TILE[0] columns and four strips of inputs, each
    staging the outputs that cover it at the tiled kernel's pitch (``plain_pitch``)."""
    K = kernel_size
    R = input_strip(K, 1)
    slot_rows = TILE[1] // PAIR_SLOTS * R
    rows, cols = slot_rows - 1 + K, TILE[0] - 1 + K
    pitch = plain_pitch(cols, 1, R)
    first = K // 2 - K + 1  # the first output row (column) staged, relative to the image's
    box_rows, box_cols = min(slot_rows, rows + first), min(TILE[0], cols + first)
    floats = (2 + MAX_CHANNEL_CHUNK) * PAIR_SLOTS * rows * pitch + K * K
    return PackedShape(R, slot_rows, rows, cols, pitch, rows * pitch, floats, box_rows, box_cols)


def pairs_input_bytes(kernel_size: int) -> int:
    """Bytes of dynamic shared memory of lr_backward_input_pairs at (K, stride 1)."""
    return 4 * pairs_input_shape(kernel_size).floats


def packed_shared_bytes(kernel_size: int, stride: int) -> int:
    """Bytes of dynamic shared memory of lr_forward_packed at (K, stride)."""
    return 4 * packed_shape(kernel_size, stride).floats


def packed_query_bytes(kernel_size: int, stride: int) -> int:
    """Bytes of dynamic shared memory of lr_backward_query_packed at (K, stride)."""
    return 4 * packed_query_shape(kernel_size, stride).floats


def packed_input_bytes(kernel_size: int) -> int:
    """Bytes of dynamic shared memory of lr_backward_input_packed at (K, stride 1)."""
    return 4 * packed_input_shape(kernel_size).floats


def _fits(height: int, width: int, packed: PackedShape) -> bool:
    """Whether images of height x width positions fit a slot and the kernel's shared memory
    MAX_OPTIN_SHARED."""
    return (
        height <= packed.slot_rows and width <= SLOT_WIDTH and 4 * packed.floats <= MAX_OPTIN_SHARED
    )


def forward_packed(shape: LocalRelationShape) -> bool:
    """Whether the forward of ``shape`` runs lr_forward_packed (its outputs fit a slot)."""
    packed = packed_shape(shape.kernel_size, shape.stride)
    return _fits(shape.out_height, shape.out_width, packed)


def forward_pairs(shape: LocalRelationShape) -> bool:
    """Whether the forward of ``shape`` runs lr_forward_pairs: its outputs fit a slot of it (a
    tile's columns, half its rows) but not one of lr_forward_packed, within
    MAX_OPTIN_SHARED."""
    pairs = pairs_shape(shape.kernel_size, shape.stride)
    return (
        not forward_packed(shape)
        and shape.out_height <= pairs.slot_rows
        and shape.out_width <= TILE[0]
        and 4 * pairs.floats <= MAX_OPTIN_SHARED
    )


def query_packed(shape: LocalRelationShape) -> bool:
    """Whether the backward query of ``shape`` runs lr_backward_query_packed (its outputs fit a
    slot)."""
    packed = packed_query_shape(shape.kernel_size, shape.stride)
    return _fits(shape.out_height, shape.out_width, packed)


def query_pairs(shape: LocalRelationShape) -> bool:
    """Whether the backward query of ``shape`` runs lr_backward_query_pairs: stride 1, its
    outputs fit one tile of lr_backward_query but not a slot of lr_backward_query_packed, within
    MAX_OPTIN_SHARED."""
    pairs = pairs_query_shape(shape.kernel_size, shape.stride)
    return (
        shape.stride == 1
        and not query_packed(shape)
        and shape.out_height <= pairs.slot_rows
        and shape.out_width <= TILE[0]
        and 4 * pairs.floats <= MAX_OPTIN_SHARED
    )


def input_packed(shape: LocalRelationShape) -> bool:
    """Whether the backward input of ``shape`` runs lr_backward_input_packed: stride 1 and its
    inputs fit a slot."""
    packed = packed_input_shape(shape.kernel_size)
    return shape.stride == 1 and _fits(shape.height, shape.width, packed)


def input_pairs(shape: LocalRelationShape) -> bool:
    """Whether the backward input of ``shape`` runs lr_backward_input_pairs: stride 1, its
    inputs fit a slot of it (a tile's columns, half its rows) but not one of
    lr_backward_input_packed, within MAX_OPTIN_SHARED."""
    pairs = pairs_input_shape(shape.kernel_size)
    return (
        shape.stride == 1
        and not input_packed(shape)
        and shape.height <= pairs.slot_rows
        and shape.width <= TILE[0]
        and 4 * pairs.floats <= MAX_OPTIN_SHARED
    )


def plain_pitch(cols: int, stride: int, strip: int) -> int:
    """Row pitch of lr_backward_input's tiles (``lr_plain_pitch``): padded for half-warps
    ``strip`` output rows apart at stride 1, unpadded otherwise."""
    return padded_pitch(cols, strip) if stride == 1 else cols


def channel_chunk(fixed: int, per: int) -> int:
    """Channels staged at once (``lr_chunk``): as many tiles of ``per`` floats as fit next to
    ``fixed`` floats in 48 KB, between 1 and MAX_CHANNEL_CHUNK."""
    return max(1, min(MAX_CHANNEL_CHUNK, (_SHARED_FLOATS - fixed) // per))


def _query_tile(kernel_size: int, stride: int, strip: int) -> int:
    """``lr_query_tile``: floats of one staged tile of the forward / backward query."""
    rows, cols = _query_rows_cols(kernel_size, stride, strip)
    return rows * shared_pitch(cols, stride, strip * stride)


def _query_rows_cols(kernel_size: int, stride: int, strip: int) -> tuple[int, int]:
    """Input rows and columns staged under one output tile of the forward / backward query."""
    K, S = kernel_size, stride
    return (TILE[1] * strip - 1) * S + K, (TILE[0] - 1) * S + K


def key_grad_pitch(kernel_size: int, stride: int, strip: int) -> int:
    """``lr_key_grad_pitch``: floats of one thread row's copy of lr_backward_query's key
    gradient."""
    K, S = kernel_size, stride
    rows = (strip - 1) * S + K
    return padded_pitch(rows * shared_pitch(_query_rows_cols(K, S, strip)[1], S, strip * S), 1)


def _query_fixed(kernel_size: int, stride: int, strip: int, copies: bool) -> int:
    """``lr_query_fixed``: lr_backward_query's shared floats besides its channel tiles (with
    ``copies``, its key-gradient copies too)."""
    K = kernel_size
    fixed = _query_tile(K, stride, strip) + 2 * K * K + K * RED_PITCH + K * 8
    return fixed + (TILE[1] * key_grad_pitch(K, stride, strip) if copies else 0)


def query_strip(kernel_size: int, stride: int) -> int:
    """Outputs per thread of lr_backward_query (``lr_query_strip``; of lr_forward where
    forward_strip is not 4): the tallest strip with which lr_backward_query's shared arrays fit
    48 KB."""
    for strip in QUERY_STRIPS:
        tile = _query_tile(kernel_size, stride, strip)
        if _query_fixed(kernel_size, stride, strip, False) + tile <= _SHARED_FLOATS:
            return strip
    return 1


def key_grad_shared(kernel_size: int, stride: int) -> bool:
    """Whether lr_backward_query's key-gradient copies fit in shared memory
    (``lr_key_grad_shared``); where not, they live in a global workspace (``key_grad_work``)."""
    R = query_strip(kernel_size, stride)
    need = _query_fixed(kernel_size, stride, R, True) + _query_tile(kernel_size, stride, R)
    return need <= _SHARED_FLOATS


def key_grad_work(kernel_size: int, stride: int) -> int:
    """Floats of global workspace per lr_backward_query block: its key-gradient copies where
    they do not fit in shared memory, else 0."""
    if key_grad_shared(kernel_size, stride):
        return 0
    return TILE[1] * key_grad_pitch(kernel_size, stride, query_strip(kernel_size, stride))


def _forward_geo(kernel_size: int) -> int:
    """``lr_forward_geo``: floats of lr_forward's s_geo (the prior logits)."""
    return kernel_size * kernel_size


def forward_strip(kernel_size: int, stride: int) -> int:
    """Outputs per thread of lr_forward (``lr_forward_strip``): 4 at kernel_size <= 7 where its k
    tile and MAX_CHANNEL_CHUNK channel tiles at strips of 4 fit 48 KB next to geo, else
    query_strip."""
    K = kernel_size
    floats = (1 + MAX_CHANNEL_CHUNK) * _query_tile(K, stride, 4) + _forward_geo(K)
    if K <= 7 and floats <= _SHARED_FLOATS:
        return 4
    return query_strip(K, stride)


def input_strip(kernel_size: int, stride: int) -> int:
    """Input rows per thread of lr_backward_input (``lr_input_strip``)."""
    return 4 if stride == 1 else 1


def strip(kernel: str, kernel_size: int, stride: int) -> int:
    """Positions per thread (a vertical strip) of one kernel instantiation."""
    if kernel in ("lr_backward_input", "lr_backward_input_pairs", "lr_backward_input_packed"):
        return input_strip(kernel_size, stride)
    if kernel in ("lr_forward", "lr_forward_pairs", "lr_forward_packed"):
        return forward_strip(kernel_size, stride)
    return query_strip(kernel_size, stride)


def kernel_tiles(kernel: str, kernel_size: int, stride: int) -> tuple[int, int, int]:
    """(floats of one staged tile, channels staged at once, other shared floats) of one kernel
    instantiation, as declared in kernels/local_relation.cu."""
    K, S = kernel_size, stride
    R = strip(kernel, K, S)
    if kernel in PACKED_KERNELS:  # dynamic shared memory only
        return 0, 0, 0
    if kernel == "lr_forward":  # s_k, s_x, s_geo (and the bound on the logits, a NaN flag)
        tile = _query_tile(K, S, R)
        fixed = tile + _forward_geo(K)
    elif kernel == "lr_backward_query":  # s_k, s_x, s_geo, s_row, s_part, s_gacc, s_gk
        tile = _query_tile(K, S, R)
        fixed = _query_fixed(K, S, R, key_grad_shared(K, S))
    elif kernel == "lr_backward_input":  # s_q, s_shift, s_gy, s_geo
        nc = (K - 1) // S + 1
        out_h = (TILE[1] * R + S - 2) // S + nc
        tile = out_h * plain_pitch((TILE[0] + S - 2) // S + nc, S, R)
        fixed = 2 * tile + K * K
    else:
        raise KeyError(kernel)
    return tile, channel_chunk(fixed, tile), fixed


def vector_width(kernel: str, kernel_size: int, stride: int) -> int:
    """Staged channels side by side at each position of one kernel instantiation's channel tiles
    (``lr_vec_width``): 4, 2 or 1, the largest dividing the chunk."""
    if kernel in PACKED_KERNELS:
        chunk = MAX_CHANNEL_CHUNK
    else:
        chunk = kernel_tiles(kernel, kernel_size, stride)[1]
    return next(v for v in (4, 2, 1) if chunk % v == 0)


def static_shared_bytes(kernel: str, kernel_size: int, stride: int) -> int:
    """Bytes of the ``__shared__`` arrays of one kernel instantiation, as declared in
    kernels/local_relation.cu (tests/test_kernels_budget.py checks them against ptxas):
    rounded up to 16 bytes, where the dynamic shared memory of the module (LR_DYNAMIC_SHARED,
    16-byte aligned) would start."""
    tile, chunk, fixed = kernel_tiles(kernel, kernel_size, stride)
    return -(-4 * (fixed + chunk * tile) // 16) * 16


def images_per_block(kernel: str) -> int:
    """Images (slots) a block of one packed kernel (``PACKED_KERNELS``) holds."""
    if kernel in PAIR_KERNELS:
        return PAIR_SLOTS
    if kernel == "lr_backward_query_packed":
        return QUERY_SLOTS
    if kernel in PACKED_KERNELS:
        return SLOTS
    raise KeyError(kernel)


def packed_geometry(kernel: str, kernel_size: int, stride: int) -> PackedShape:
    """The geometry of one packed kernel (``PACKED_KERNELS``) at (K, stride)."""
    if kernel == "lr_forward_pairs":
        return pairs_shape(kernel_size, stride)
    if kernel == "lr_forward_packed":
        return packed_shape(kernel_size, stride)
    if kernel == "lr_backward_query_packed":
        return packed_query_shape(kernel_size, stride)
    if kernel == "lr_backward_query_pairs":
        return pairs_query_shape(kernel_size, stride)
    if kernel == "lr_backward_input_pairs":
        return pairs_input_shape(kernel_size)
    if kernel == "lr_backward_input_packed":
        return packed_input_shape(kernel_size)
    raise KeyError(kernel)


def dynamic_shared_bytes(kernel: str, kernel_size: int, stride: int) -> int:
    """Bytes of dynamic shared memory a launch of one kernel instantiation asks for: a packed
    kernel's tiles, 0 for the others (and for the empty bodies of lr_backward_input_packed and
    lr_backward_input_pairs and lr_backward_query_pairs at strides other than 1)."""
    if kernel not in PACKED_KERNELS or (kernel in STRIDE_ONE_KERNELS and stride != 1):
        return 0
    return 4 * packed_geometry(kernel, kernel_size, stride).floats


def kernels_fit(kernel_size: int, stride: int) -> tuple[bool, str]:
    """Whether the kernels run (K, stride): K <= MAX_KERNEL_SIZE and every kernel within the
    static shared-memory limit; the reason when not (the automatic backend then falls back to
    the next one)."""
    if kernel_size > MAX_KERNEL_SIZE:
        return False, (
            f"the 'cupy' kernels support kernel_size <= {MAX_KERNEL_SIZE}, got {kernel_size}; "
            "use the 'cpu' or 'reference' backend"
        )
    need = max(static_shared_bytes(k, kernel_size, stride) for k in KERNEL_NAMES)
    if need > MAX_STATIC_SHARED:
        return False, (
            f"the 'cupy' kernels need {need} bytes of shared memory per block at "
            f"kernel_size={kernel_size}, stride={stride} (limit {MAX_STATIC_SHARED}); "
            "use the 'cpu' or 'reference' backend"
        )
    return True, ""


#: The largest offset the kernels compute in 32 bits: the tile loaders' element offsets (in a
#: plane; in a packed block, over its images), a strip's accesses (over a group's channels), and
#: the backward kernels' tile numbers (lr_tile_of, over a launch's tile list).
MAX_OFFSET = 2**31 - 1


def query_kernel(shape: LocalRelationShape) -> str:
    """The backward-query kernel of ``shape``: ``lr_backward_query_packed`` where the images fit
    its slots (``query_packed``), ``lr_backward_query_pairs`` where they fit one tile at stride
    1 (``query_pairs``), else ``lr_backward_query``."""
    if query_packed(shape):
        return "lr_backward_query_packed"
    if query_pairs(shape):
        return "lr_backward_query_pairs"
    return "lr_backward_query"


def query_tile_list(shape: LocalRelationShape, kernel: str | None = None) -> int:
    """Tiles of the backward query's list per group (``kernel``, by default the shape's
    ``query_kernel``): output tiles of its B planes, or tiles of its images per block
    (QUERY_SLOTS packed, PAIR_SLOTS paired)."""
    kernel = kernel or query_kernel(shape)
    if kernel != "lr_backward_query":
        return -(-shape.batch // images_per_block(kernel))
    strip = query_strip(shape.kernel_size, shape.stride)
    return shape.batch * _tiles(shape.out_height, shape.out_width, strip)


def input_tile_list(shape: LocalRelationShape) -> int:
    """Tiles of lr_backward_input's list over the launch, a block each: input tiles of every
    (b, g) plane, or tiles of SLOTS images of a group where packed (``input_packed``), of
    PAIR_SLOTS where paired (``input_pairs``)."""
    if input_packed(shape):
        return shape.groups * -(-shape.batch // SLOTS)
    if input_pairs(shape):
        return shape.groups * -(-shape.batch // PAIR_SLOTS)
    strip = input_strip(shape.kernel_size, shape.stride)
    return shape.batch * shape.groups * _tiles(shape.height, shape.width, strip)


def backward_tiles(shape: LocalRelationShape) -> int:
    """The longer of the backward kernels' tile lists (``query_tile_list``,
    ``input_tile_list``)."""
    return max(query_tile_list(shape), input_tile_list(shape))


def offsets_fit(shape: LocalRelationShape) -> tuple[bool, str]:
    """Whether the kernels' 32-bit offsets hold for ``shape``: a group's m channel planes (input
    and output) span at most MAX_OFFSET positions and, where a packed kernel runs, so do its
    SLOTS images of C channels (the pairs kernels: PAIR_SLOTS images); the backward kernels list
    at most MAX_OFFSET tiles (``backward_tiles``); the reason when not."""
    plane = max(shape.height * shape.width, shape.out_height * shape.out_width)
    group = shape.channels_per_group * plane
    if forward_packed(shape) or query_packed(shape) or input_packed(shape):
        images = SLOTS * shape.channels * plane
    elif forward_pairs(shape) or query_pairs(shape) or input_pairs(shape):
        images = PAIR_SLOTS * shape.channels * plane
    else:
        images = 0
    if group > MAX_OFFSET or images > MAX_OFFSET:
        return False, (
            f"the 'cupy' kernels index a group's channels with 32-bit offsets, at most "
            f"{MAX_OFFSET} positions; got {shape.channels_per_group} channels of "
            f"{shape.height} x {shape.width} inputs and {shape.out_height} x {shape.out_width} "
            f"outputs ({shape.channels} in all); use the 'cpu' or 'reference' backend"
        )
    tiles = backward_tiles(shape)
    if tiles > MAX_OFFSET:
        return False, (
            f"the 'cupy' kernels number a launch's tiles with 32-bit offsets, at most "
            f"{MAX_OFFSET} tiles; got {tiles} tiles of {shape.batch} images of {shape.groups} "
            f"groups of {shape.height} x {shape.width} inputs; use the 'cpu' or 'reference' "
            f"backend"
        )
    return True, ""


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel launch: which kernel, its grid and block, and dynamic shared memory bytes."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int = 0


def _tiles(height: int, width: int, strip: int) -> int:
    """Tiles of LR_TILE_W x LR_TILE_H * strip positions over a (height, width) plane."""
    return -(-height // (TILE[1] * strip)) * -(-width // TILE[0])


def _config(kernel: str, blocks: int, shape: LocalRelationShape) -> LaunchConfig | None:
    """A launch of ``blocks`` blocks of one tile's threads, with the kernel's dynamic shared
    memory at the shape's (K, stride) (``dynamic_shared_bytes``: 0 but for a packed kernel);
    None without a block."""
    if blocks <= 0:
        return None
    grid, block = (min(blocks, MAX_BLOCKS), 1, 1), (TILE[0], TILE[1], 1)
    shared = dynamic_shared_bytes(kernel, shape.kernel_size, shape.stride)
    return LaunchConfig(kernel, grid, block, shared)


def plan_forward(shape: LocalRelationShape) -> LaunchConfig | None:
    """Launch of ``lr_forward``: one block per output tile of each (b, g) plane; or, where the
    images fit a slot (``forward_packed``), of ``lr_forward_packed``: one block per SLOTS images
    of a group, its tiles in dynamic shared memory; where they fit half a tile's rows
    (``forward_pairs``), of ``lr_forward_pairs``: one block per PAIR_SLOTS images of a group.
    None when there is no output."""
    if shape.out_height * shape.out_width <= 0:
        return None
    if forward_pairs(shape) or forward_packed(shape):
        kernel = "lr_forward_pairs" if forward_pairs(shape) else "lr_forward_packed"
        blocks = shape.groups * -(-shape.batch // images_per_block(kernel))
        return _config(kernel, blocks, shape)
    tiles = _tiles(
        shape.out_height, shape.out_width, forward_strip(shape.kernel_size, shape.stride)
    )
    return _config("lr_forward", shape.batch * shape.groups * tiles, shape)


def query_chunks(shape: LocalRelationShape, multiprocessors: int, kernel: str | None = None) -> int:
    """Blocks per group of the backward query (``kernel``, by default the shape's
    ``query_kernel``): enough blocks to fill every SM, at most one per tile of the group, at
    least one. lr_backward_query_packed and _pairs (several images per tile) aim for the blocks
    their shared memory lets an SM hold at once (3 and 4 on sm_90 at K = 7): each block fills
    its tiles once with what lies outside the images, so fewer blocks that run more tiles each
    pay that less often."""
    kernel = kernel or query_kernel(shape)
    tiles = query_tile_list(shape, kernel)
    blocks_per_sm = THREADS_PER_SM // (TILE[0] * TILE[1])
    if kernel != "lr_backward_query":
        need = dynamic_shared_bytes(kernel, shape.kernel_size, shape.stride) + SHARED_RESERVED
        blocks_per_sm = max(1, min(blocks_per_sm, SHARED_PER_SM // need))
    target = -(-(max(1, multiprocessors) * blocks_per_sm) // max(1, shape.groups))
    return max(1, min(tiles, target))


def plan_backward_query(shape: LocalRelationShape, nchunks: int) -> LaunchConfig | None:
    """Launch of ``lr_backward_query``: G * nchunks blocks; of ``lr_backward_query_packed``
    where the images fit its slots (``query_packed``), of ``lr_backward_query_pairs`` where they
    fit one tile at stride 1 (``query_pairs``), their arrays in dynamic shared memory."""
    if shape.batch * shape.out_height * shape.out_width <= 0:
        return None
    return _config(query_kernel(shape), shape.groups * nchunks, shape)


def key_partials(kernel_size: int, stride: int, out_height: int, out_width: int) -> int:
    """Floats of lr_backward_query's grad-k partials per (b, g) plane: one per staged input
    position of each output tile."""
    strip = query_strip(kernel_size, stride)
    rows, cols = _query_rows_cols(kernel_size, stride, strip)
    return _tiles(out_height, out_width, strip) * rows * cols


def plan_backward_input(shape: LocalRelationShape) -> LaunchConfig | None:
    """Launch of ``lr_backward_input``: one block per input tile of each (b, g) plane; or, where
    the images fit a slot (``input_packed``), of ``lr_backward_input_packed``: one block per
    SLOTS images of a group, its tiles in dynamic shared memory; where they fit half a tile's
    rows at stride 1 (``input_pairs``), of ``lr_backward_input_pairs``: one block per
    PAIR_SLOTS images of a group."""
    kernel = "lr_backward_input"
    if input_packed(shape):
        kernel = "lr_backward_input_packed"
    elif input_pairs(shape):
        kernel = "lr_backward_input_pairs"
    return _config(kernel, input_tile_list(shape), shape)


def pack_arg(arg: Any) -> Any:
    """What CuPy receives for one kernel argument: a tensor becomes its device pointer as
    ``np.uint64`` (CuPy packs it as a 64-bit pointer); numpy scalars pass unchanged."""
    if isinstance(arg, torch.Tensor):
        return np.uint64(arg.data_ptr())
    if not isinstance(arg, np.generic):
        raise TypeError(f"kernel arguments must be tensors or numpy scalars, got {type(arg)}")
    return arg


class Launcher(Protocol):
    """Runs the kernels of one (device, dtype, K, stride): the seam between the autograd
    Function and the machine that executes the kernels (CuPy on a GPU, or a host emulator)."""

    multiprocessors: int

    def context(self) -> contextlib.AbstractContextManager[None]:
        """Entered around the launches of one forward or backward."""
        ...

    def launch(self, config: LaunchConfig, args: tuple) -> None:
        """Run one kernel; ``args`` hold tensors and numpy scalars in the kernel's order."""
        ...


#: Builds the launcher for (device, kernel storage type, K, stride).
LauncherFactory = Callable[[torch.device, str, int, int], Launcher]


@dataclass(frozen=True)
class CupyKernels:
    """The compiled kernels of one (device, dtype, K, stride), by kernel name (KERNEL_NAMES).
    (Until v16 a field per kernel, filled in KERNEL_NAMES order: v15's pairs kernels had no
    field, so the eight compiled functions did not fit the six fields.)"""

    functions: dict[str, Any]

    def by_name(self, kernel: str) -> Any:
        return self.functions[kernel]


@functools.cache
def get_kernels(device_index: int, ctype: str, kernel_size: int, stride: int) -> CupyKernels:
    """Compile (first call) or fetch (later calls) the kernels for one device and configuration."""
    import cupy

    names = [name_expression(k, ctype, kernel_size, stride) for k in KERNEL_NAMES]
    log.debug("compiling %s on cuda:%d: %s", KERNEL_SOURCE, device_index, names)
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(
            code=load_kernel_source(KERNEL_SOURCE),
            options=COMPILE_OPTIONS,  # CuPy adds nvrtc.CUPY_ADDED_OPTIONS itself
            name_expressions=names,
        )
        functions = [module.get_function(name) for name in names]
        for fn in functions:  # load the module on this device now, not during a launch
            _ = fn.attributes
    return CupyKernels(dict(zip(KERNEL_NAMES, functions, strict=True)))


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


class CupyLauncher:
    """Launches the NVRTC-compiled kernels with CuPy on PyTorch's current stream."""

    def __init__(self, device: torch.device, ctype: str, kernel_size: int, stride: int) -> None:
        self.device = device
        index = device.index if device.index is not None else 0
        self.kernels = get_kernels(index, ctype, kernel_size, stride)
        self.multiprocessors = torch.cuda.get_device_properties(index).multi_processor_count

    def context(self) -> contextlib.AbstractContextManager[None]:
        return _launch_context(self.device)

    def launch(self, config: LaunchConfig, args: tuple) -> None:
        fn = self.kernels.by_name(config.kernel)
        if config.shared_bytes > MAX_STATIC_SHARED and (
            fn.max_dynamic_shared_size_bytes < config.shared_bytes
        ):  # opt in (up to MAX_OPTIN_SHARED, which plan_forward keeps to)
            fn.max_dynamic_shared_size_bytes = config.shared_bytes
        fn(config.grid, config.block, tuple(map(pack_arg, args)), shared_mem=config.shared_bytes)


@functools.cache
def kernels_usable(device_index: int, ctype: str) -> bool:
    """Probe once per (device, dtype): can the kernels be compiled and loaded here?

    Compiles one instantiation (K = 3, stride 1). On failure logs one warning line naming what
    to install, and returns False so that the automatic backend falls back to the reference op.
    """
    try:
        get_kernels(device_index, ctype, 3, 1)
    except Exception as err:  # any compile / load failure means: not usable on this machine
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        log.warning(
            "the 'cupy' local relation backend cannot build its kernels on cuda:%d (%s: %s); "
            "using the reference backend. Install CuPy with its CUDA toolkit components: "
            "pip install 'robustlr[cuda13]' (cupy-cuda13x[ctk]) or 'robustlr[cuda12]'",
            device_index,
            type(err).__name__,
            first,
        )
        return False
    return True


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
    return tuple(np.int64(v) for v in shape.sizes())


def _launcher(factory: LauncherFactory, x: Tensor, shape: LocalRelationShape) -> Launcher:
    return factory(x.device, CTYPE_OF_DTYPE[x.dtype], shape.kernel_size, shape.stride)


class _LocalRelationCupy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, geo, shape: LocalRelationShape, composability: str, factory):
        dtypes = (q.dtype, k.dtype, geo.dtype)
        xc, qc, kc, geoc = _prepare(x, q, k, geo)
        B, C, G = shape.batch, shape.channels, shape.groups
        Ho, Wo = shape.out_height, shape.out_width
        y = torch.empty((B, C, Ho, Wo), dtype=xc.dtype, device=xc.device)
        lse = torch.empty((B, G, Ho, Wo), dtype=torch.float32, device=xc.device)
        comp = np.int32(COMPOSABILITY_CODES[composability])
        launcher = _launcher(factory, xc, shape)
        config = plan_forward(shape)
        if config is not None:
            with launcher.context():
                launcher.launch(config, (xc, qc, kc, geoc, y, lse, *_sizes(shape), comp))
        ctx.save_for_backward(xc, qc, kc, geoc, lse, y)
        ctx.shape = shape
        ctx.composability = composability
        ctx.input_dtypes = dtypes
        ctx.factory = factory
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, q, k, geo, lse, y = ctx.saved_tensors
        shape: LocalRelationShape = ctx.shape
        q_dtype, k_dtype, geo_dtype = ctx.input_dtypes
        need_x, need_q, need_k, need_geo = ctx.needs_input_grad[:4]
        G, K = shape.groups, shape.kernel_size
        gy = grad_y.to(x.dtype).contiguous()
        comp = np.int32(COMPOSABILITY_CODES[ctx.composability])
        launcher = _launcher(ctx.factory, x, shape)
        sizes = _sizes(shape)

        gq = torch.empty_like(q)
        nchunks = query_chunks(shape, launcher.multiprocessors)
        query = plan_backward_query(shape, nchunks)
        if not (need_q or need_k or need_geo):
            query = None
        # every entry is written by lr_backward_query; where it is not launched, zeros
        alloc = torch.empty if query is not None else torch.zeros
        geo_partial = alloc((G, K * K, nchunks), dtype=torch.float32, device=x.device)
        partials = key_partials(K, shape.stride, shape.out_height, shape.out_width)
        gk_partial = alloc((shape.batch * G * partials,), dtype=torch.float32, device=x.device)
        # lr_backward_query's key-gradient copies where they do not fit in shared memory
        work = G * nchunks * key_grad_work(K, shape.stride)
        gk_work = torch.empty((work,), dtype=torch.float32, device=x.device)
        gx = torch.empty_like(x)
        gk = torch.empty_like(k)
        inputs = plan_backward_input(shape)
        with launcher.context():
            if query is not None:
                launcher.launch(
                    query,
                    (
                        x,
                        q,
                        k,
                        geo,
                        lse,
                        y,
                        gy,
                        gq,
                        gk_partial,
                        gk_work,
                        geo_partial,
                        *sizes,
                        np.int64(nchunks),
                        comp,
                    ),
                )
            if (need_x or need_k) and inputs is not None:
                launcher.launch(inputs, (q, k, geo, lse, gy, gk_partial, gx, gk, *sizes, comp))
        grad_x = gx if need_x else None
        grad_q = gq.to(q_dtype) if need_q else None
        grad_k = gk.to(k_dtype) if need_k else None
        grad_geo = geo_partial.sum(-1).view(G, K, K).to(geo_dtype) if need_geo else None
        return grad_x, grad_q, grad_k, grad_geo, None, None, None


def local_relation_cupy(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    geo: Tensor,
    shape: LocalRelationShape,
    composability: str,
    launcher: LauncherFactory | None = None,
) -> Tensor:
    """CuPy local relation (arguments already checked by ``contract.check_inputs``, qk_dim 1).

    ``launcher`` builds what runs the kernels; the default, ``CupyLauncher``, needs CUDA tensors.
    The tests pass a host launcher that runs the same kernels on the CPU.

    Shape: x (B, C, H, W), q (B, G, Ho, Wo), k (B, G, H, W), geo (G, K, K) -> (B, C, Ho, Wo).
    """
    if shape.qk_dim != 1:
        raise ValueError("the 'cupy' backend supports qk_dim = 1 only")
    for fits, reason in (kernels_fit(shape.kernel_size, shape.stride), offsets_fit(shape)):
        if not fits:
            raise ValueError(reason)
    if launcher is None and x.device.type != "cuda":
        raise RuntimeError(f"the 'cupy' backend runs on CUDA tensors, got a {x.device} tensor")
    if x.dtype not in CTYPE_OF_DTYPE:
        raise TypeError(
            f"the 'cupy' local relation backend supports float32, float16 and bfloat16, got "
            f"{x.dtype}; use backend='reference' for float64 (e.g. for gradcheck)"
        )
    return _LocalRelationCupy.apply(x, q, k, geo, shape, composability, launcher or CupyLauncher)
