"""Compiled CPU backend of the local relation op: fused C++/OpenMP kernels (``kernels/``).

Build: ``kernels/local_relation_cpu.cpp`` with ``kernels/local_relation_cpu_impl.h`` (plain
C++ and OpenMP, no PyTorch headers, so the build takes seconds) is compiled on first use with
``torch.utils.cpp_extension.load`` (needs ``ninja`` and a C++ compiler; ``BUILD_FLAGS``, no
``-march``: the kernels are compiled for the baseline instruction set and, on x86-64, once more
for AVX2 + FMA, chosen at run time, so the library runs on any CPU of its architecture). The
library goes into PyTorch's extension cache (``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``), in a directory named after a hash of the sources and flags:
later processes load it without building. It is called through ``ctypes`` with raw pointers
of contiguous tensors.

Where it cannot be built (no compiler, no ninja), ``load_library`` raises
``CpuBackendUnavailable``, logging one warning line with the reason once per process; the
automatic backend choice then falls back to ``reference`` (see ``robustlr.ops.dispatch``).

Dtypes: float32 and float64 run natively; float16 and bfloat16 are cast to float32 and the
output and gradients cast back (the reference backend also computes them in float32).

With stride s > 1, x and k are first split by the stride into s*s components of the output's
size (one copy; the kernel source says why). Forward saves x, q, k, geo (contiguous, compute
dtype: no copy when they already are and s = 1), the output and a per-(b, g, i, j)
log-sum-exp. Backward recomputes the softmax weights from the log-sum-exp; each (batch, group)
pair owns its gradient slices (no races), and grad geo is summed over per-(b, g) partials with
``torch.sum`` (deterministic).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from robustlr.ops.contract import LocalRelationShape
from robustlr.ops.reference import compute_dtype
from robustlr.resources import resource_dir

log = logging.getLogger(__name__)

Tensor = torch.Tensor

KERNEL_SOURCE = "local_relation_cpu.cpp"
KERNEL_HEADER = "local_relation_cpu_impl.h"
EXTENSION_NAME = "robustlr_local_relation_cpu"
BUILD_FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast")
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


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Make the ``ninja`` of this environment findable during the build, also when the
    virtual environment is not activated (its bin directory is then not on PATH)."""
    if shutil.which("ninja"):
        yield
        return
    extra = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja

        extra.insert(0, ninja.BIN_DIR)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*extra, old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def build_library() -> Path:
    """Compile the kernels (or find them already compiled) and return the shared library's path.

    Raises whatever the build raises (no compiler, no ninja, a compile error).
    """
    kernels = resource_dir("kernels")
    source = kernels / KERNEL_SOURCE
    build_dir = _build_directory(source.read_text() + (kernels / KERNEL_HEADER).read_text())
    library = build_dir / f"{EXTENSION_NAME}.so"
    if library.is_file():
        return library
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C++ compiler: {compiler!r} is not on PATH")

    log.warning(
        "building robustlr's compiled CPU local relation kernels (once, a few seconds; "
        "cached in %s)",
        build_dir,
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    with _ninja_on_path():
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
    lib.lr_cpu_uses_avx2.restype = ctypes.c_int
    if lib.lr_cpu_abi_version() != _ABI_VERSION:
        raise OSError(f"unexpected ABI version {lib.lr_cpu_abi_version()} of the CPU kernels")
    log.debug("CPU local relation kernels loaded (AVX2 copy: %s)", bool(lib.lr_cpu_uses_avx2()))
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
    values = (*shape.sizes(), shape.kernel_size, shape.stride)
    return (ctypes.c_int64 * len(values))(*values)


def _threads(shape: LocalRelationShape) -> int:
    """PyTorch's intra-op thread count, but one thread for calls too small to share out."""
    work = shape.batch * shape.groups * shape.out_height * shape.out_width
    work *= shape.kernel_size**2 * (shape.channels_per_group + 2)
    return max(1, min(torch.get_num_threads(), work // _WORK_PER_THREAD))


def _polyphase(t: Tensor, s: int, out_h: int, out_w: int) -> Tensor:
    """Split by the stride: (B, C, H, W) -> (B, C, s*s, Ho, Wo), component (u, v) at (i, j)
    holding input (i*s + u, j*s + v), zero outside the image. Stride 1: t itself."""
    if s == 1:
        return t.contiguous()
    b, c, h, w = t.shape
    t = F.pad(t, (0, s * out_w - w, 0, s * out_h - h))
    t = t.reshape(b, c, out_h, s, out_w, s).permute(0, 1, 3, 5, 2, 4).contiguous()
    return t.reshape(b, c, s * s, out_h, out_w)


def _merge_polyphase(t: Tensor, s: int, h: int, w: int) -> Tensor:
    """Inverse of ``_polyphase``. Shape: (B, C, s*s, Ho, Wo) -> (B, C, H, W)."""
    if s == 1:
        return t
    b, c, _, out_h, out_w = t.shape
    t = t.reshape(b, c, s, s, out_h, out_w).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(b, c, out_h * s, out_w * s)[:, :, :h, :w]


def _ptrs(*tensors: Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


class _LocalRelationCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, geo, shape: LocalRelationShape, composability: str):
        lib = load_library()
        ct = compute_dtype(x.dtype)
        B, G, Ho, Wo = shape.batch, shape.groups, shape.out_height, shape.out_width
        s = shape.stride
        xc, kc = (_polyphase(t.detach().to(ct), s, Ho, Wo) for t in (x, k))
        qc, gc = (t.detach().to(ct).contiguous() for t in (q, geo))
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
        H, W, s = shape.height, shape.width, shape.stride
        grads = (_merge_polyphase(gx, s, H, W), gq, _merge_polyphase(gk, s, H, W), ggeo_part.sum(0))
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
