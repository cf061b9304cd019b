"""Compiled CPU backend of the local relation op: fused C++/OpenMP kernels (``kernels/``).

The source ``kernels/local_relation_cpu.cpp`` (plain C++ with OpenMP, no PyTorch headers, so
the build takes seconds) is compiled on first use with ``torch.utils.cpp_extension.load``
(``ninja`` and a C++ compiler; flags ``-O3 -fopenmp -fno-trapping-math``, no ``-march``: the
library runs on any x86-64/arm64 CPU of its kind) into PyTorch's extension cache
(``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``), in a directory named after a
hash of the source and the flags: later processes load the cached library without building.
The library is called through ``ctypes`` with raw pointers of contiguous NCHW tensors.

Where it cannot be built (no compiler, no ninja), ``load_library`` raises
``CpuBackendUnavailable``, logging one warning line with the reason once per process; the
automatic backend choice then falls back to ``reference`` (see ``robustlr.ops.dispatch``).

Dtypes: float32 and float64 run natively; float16 and bfloat16 are cast to float32 and the
output and gradients cast back (the reference backend also computes them in float32).

Forward saves x, q, k, geo (the contiguous compute-dtype copies, no copy when they already
are), the output and a per-(b, g, i, j) log-sum-exp. Backward recomputes the softmax weights
from the log-sum-exp; each (batch, group) pair owns its gradient slices (no races), and grad
geo is summed over per-(b, g) partials with ``torch.sum`` (deterministic).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from robustlr.ops.contract import LocalRelationShape
from robustlr.ops.reference import compute_dtype
from robustlr.resources import resource_dir

log = logging.getLogger(__name__)

Tensor = torch.Tensor

KERNEL_SOURCE = "local_relation_cpu.cpp"
EXTENSION_NAME = "robustlr_local_relation_cpu"
BUILD_FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
LINK_FLAGS = ("-fopenmp",)
#: Composability codes of the kernels (kSqdiff, kAbsdiff, kMul in the source).
COMPOSABILITY_CODES = {"sqdiff": 0, "absdiff": 1, "mul": 2}
_ABI_VERSION = 1
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
#: Multiply-adds below which one more thread costs more than it saves (thread wake-up).
_WORK_PER_THREAD = 1 << 18


class CpuBackendUnavailable(RuntimeError):
    """The compiled CPU backend could not be built or loaded here."""


def _build_directory(source_text: str) -> Path:
    """PyTorch's extension cache (without importing cpp_extension, which is slow and chatty)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(os.path.expanduser(cache), "torch_extensions")
    key = hashlib.sha256("\n".join([source_text, *BUILD_FLAGS, *LINK_FLAGS]).encode())
    return Path(root) / f"{EXTENSION_NAME}_{key.hexdigest()[:16]}"


def build_library() -> Path:
    """Compile the kernels (or find them already compiled) and return the shared library's path.

    Raises whatever the build raises (no compiler, no ninja, a compile error).
    """
    source = resource_dir("kernels") / KERNEL_SOURCE
    build_dir = _build_directory(source.read_text())
    library = build_dir / f"{EXTENSION_NAME}.so"
    if library.is_file():
        return library
    from torch.utils.cpp_extension import load

    log.warning(
        "building robustlr's compiled CPU local relation kernels (once, a few seconds; "
        "cached in %s)",
        build_dir,
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    load(
        name=EXTENSION_NAME,
        sources=[str(source)],
        extra_cflags=list(BUILD_FLAGS),
        extra_ldflags=list(LINK_FLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    if not library.is_file():
        raise FileNotFoundError(f"the build finished but {library} is missing")
    return library


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    for suffix in _SUFFIX.values():
        fwd = getattr(lib, f"lr_forward_{suffix}")
        fwd.argtypes = [ptr, i32, *[ptr] * 6, i32]
        fwd.restype = None
        bwd = getattr(lib, f"lr_backward_{suffix}")
        bwd.argtypes = [ptr, i32, *[ptr] * 11, i32]
        bwd.restype = None
    lib.lr_cpu_abi_version.restype = ctypes.c_int
    if lib.lr_cpu_abi_version() != _ABI_VERSION:
        raise OSError(f"unexpected ABI version {lib.lr_cpu_abi_version()} of the CPU kernels")
    return lib


@functools.cache
def _load_once() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, reason); a failure logs its one warning here, once."""
    try:
        return _declare(ctypes.CDLL(str(build_library()))), ""
    except Exception as exc:  # any build or load failure means: fall back to reference
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        log.warning(
            "the compiled CPU local relation backend is unavailable, using 'reference' (%s)",
            reason,
        )
        return None, reason


def load_library() -> ctypes.CDLL:
    """The compiled kernels, built on the first call of the process (then cached on disk).

    Raises ``CpuBackendUnavailable`` with the reason when they cannot be built or loaded (the
    attempt is made once per process and its failure logged once, as a warning).
    """
    lib, reason = _load_once()
    if lib is None:
        raise CpuBackendUnavailable(reason)
    return lib


def cpu_backend_available() -> tuple[bool, str]:
    """(True, "") when the compiled kernels load (building them if needed), else (False, why)."""
    try:
        load_library()
    except CpuBackendUnavailable as exc:
        return False, f"the compiled CPU kernels could not be built: {exc}"
    return True, ""


def _dims(shape: LocalRelationShape) -> ctypes.Array:
    values = (
        shape.batch,
        shape.channels,
        shape.height,
        shape.width,
        shape.groups,
        shape.channels_per_group,
        shape.out_height,
        shape.out_width,
        shape.kernel_size,
        shape.stride,
    )
    return (ctypes.c_int64 * len(values))(*values)


def _threads(shape: LocalRelationShape) -> int:
    """PyTorch's intra-op thread count, but one thread for calls too small to share out."""
    work = shape.batch * shape.groups * shape.out_height * shape.out_width
    work *= shape.kernel_size**2 * (shape.channels_per_group + 2)
    return max(1, min(torch.get_num_threads(), work // _WORK_PER_THREAD))


def _ptrs(*tensors: Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


class _LocalRelationCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, geo, shape: LocalRelationShape, composability: str):
        lib = load_library()
        ct = compute_dtype(x.dtype)
        xc, qc, kc, gc = (t.detach().to(ct).contiguous() for t in (x, q, k, geo))
        B, G, Ho, Wo = shape.batch, shape.groups, shape.out_height, shape.out_width
        y = torch.empty(B, shape.channels, Ho, Wo, dtype=ct)
        lse = torch.empty(B, G, Ho, Wo, dtype=ct)
        if y.numel():
            getattr(lib, f"lr_forward_{_SUFFIX[ct]}")(
                _dims(shape),
                COMPOSABILITY_CODES[composability],
                *_ptrs(xc, qc, kc, gc, y, lse),
                _threads(shape),
            )
        ctx.save_for_backward(xc, qc, kc, gc, y, lse)
        ctx.shape = shape
        ctx.composability = composability
        ctx.dtypes = (x.dtype, q.dtype, k.dtype, geo.dtype)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        xc, qc, kc, gc, y, lse = ctx.saved_tensors
        shape: LocalRelationShape = ctx.shape
        ct = y.dtype
        gy = grad_y.to(ct).contiguous()
        gx, gq, gk = torch.zeros_like(xc), torch.zeros_like(qc), torch.zeros_like(kc)
        K = shape.kernel_size
        ggeo_part = torch.zeros(shape.batch, shape.groups, K, K, dtype=ct)
        if y.numel():
            getattr(load_library(), f"lr_backward_{_SUFFIX[ct]}")(
                _dims(shape),
                COMPOSABILITY_CODES[ctx.composability],
                *_ptrs(xc, qc, kc, gc, y, lse, gy, gx, gq, gk, ggeo_part),
                _threads(shape),
            )
        grads = (gx, gq, gk, ggeo_part.sum(0))
        out = [
            g.to(dtype) if need else None
            for g, dtype, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[:4], strict=True)
        ]
        return (*out, None, None)


def local_relation_cpu(
    x: Tensor, q: Tensor, k: Tensor, geo: Tensor, shape: LocalRelationShape, composability: str
) -> Tensor:
    """Compiled CPU local relation (arguments already checked by ``contract.check_inputs``).

    Shape: x (B, C, H, W), q (B, G, Ho, Wo), k (B, G, H, W), geo (G, K, K) -> (B, C, Ho, Wo).
    """
    return _LocalRelationCpu.apply(x, q, k, geo, shape, composability)
