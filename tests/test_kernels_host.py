"""The simple CUDA kernels of kernels/local_relation.cu, compiled with g++ and run on the CPU.

tests/host_shim/cuda_host_shim.h stands in for the CUDA built-ins and runs every (block, thread)
of a launch in order, which is valid for these kernels (no shared memory, no __syncthreads, no
data races). The results are compared with the float64 naive op of tests/lr_naive.py, whose
gradients come from autograd. The backend's launch logic is mirrored in ``host_local_relation``.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from lr_naive import naive_local_relation, random_inputs

from robustlr.resources import resource_dir

SHIM_DIR = Path(__file__).resolve().parent / "host_shim"
COMP_CODES = {"sqdiff": 0, "absdiff": 1, "mul": 2}
TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="session")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The kernels built into a shared library with g++, once per test session."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: cannot build the kernels for the CPU")
    out = tmp_path_factory.mktemp("host_kernels") / "liblr_host.so"
    cmd = [
        gxx,
        "-O1",  # fast to build; the kernels need no optimisation to be tested
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-Wall",
        f"-I{SHIM_DIR}",
        f"-I{resource_dir('kernels')}",
        str(SHIM_DIR / "host_launchers.cpp"),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"g++ failed:\n{proc.stderr}"
    return ctypes.CDLL(str(out))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _grid(total: int, block: int, grid: int | None) -> ctypes.c_uint:
    return ctypes.c_uint(grid if grid is not None else max(1, math.ceil(total / block)))


def host_local_relation(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    geo: torch.Tensor,
    gy: torch.Tensor,
    kernel_size: int,
    stride: int,
    composability: str,
    block: int = 64,
    grid: int | None = None,
    nchunks: int | None = None,
) -> dict[str, torch.Tensor]:
    """Forward and backward through the host-built kernels.

    Shape: x (B, C, H, W), q (B, G, Ho, Wo), k (B, G, H, W), geo (G, K, K), gy (B, C, Ho, Wo).
    """
    B, C, H, W = x.shape
    G = geo.shape[0]
    m = math.ceil(C / G)
    Ho, Wo = q.shape[-2:]
    KK = kernel_size * kernel_size
    suffix = f"{TAGS[x.dtype]}_k{kernel_size}_s{stride}"
    geo32 = geo.float().contiguous()
    sizes = [ctypes.c_longlong(v) for v in (B, C, H, W, G, m, Ho, Wo)]
    comp = ctypes.c_int(COMP_CODES[composability])
    blk = ctypes.c_uint(block)

    y = torch.empty(B, C, Ho, Wo, dtype=x.dtype)
    lse = torch.empty(B, G, Ho, Wo, dtype=torch.float32)
    getattr(lib, f"lr_host_forward_{suffix}")(
        _grid(B * G * Ho * Wo, block, grid),
        blk,
        *map(_ptr, (x, q, k, geo32, y, lse)),
        *sizes,
        comp,
    )

    npos = B * Ho * Wo
    nchunks = max(1, min(npos, nchunks if nchunks is not None else 64))
    gq = torch.empty_like(q)
    dsum = torch.empty_like(lse)
    partial = torch.full((G, KK, nchunks), float("nan"), dtype=torch.float32)
    getattr(lib, f"lr_host_backward_query_{suffix}")(
        _grid(G * nchunks, block, grid),
        blk,
        *map(_ptr, (x, q, k, geo32, lse, gy, gq, dsum, partial)),
        *sizes,
        ctypes.c_longlong(nchunks),
        comp,
    )
    gx = torch.empty_like(x)
    gk = torch.empty_like(k)
    getattr(lib, f"lr_host_backward_input_{suffix}")(
        _grid(B * G * H * W, block, grid),
        blk,
        *map(_ptr, (x, q, k, geo32, lse, dsum, gy, gx, gk)),
        *sizes,
        comp,
    )
    ggeo = partial.sum(-1).view(G, kernel_size, kernel_size)
    return {"y": y, "lse": lse, "x": gx, "q": gq, "k": gk, "geo": ggeo}


def naive_lse(q, k, geo, kernel_size, stride, composability):
    """Log-sum-exp of the in-image logits per (b, g, i, j), float64. Shape: (B, G, Ho, Wo)."""
    G = q.shape[1]
    H, W = k.shape[-2:]
    P = kernel_size // 2
    rows = torch.arange(q.shape[2]) * stride - P
    cols = torch.arange(q.shape[3]) * stride - P
    logits = []
    for a in range(kernel_size):
        for b in range(kernel_size):
            r, c = rows + a, cols + b
            ok = ((r >= 0) & (r < H))[:, None] & ((c >= 0) & (c < W))[None, :]
            kv = k[:, :, r.clamp(0, H - 1)][:, :, :, c.clamp(0, W - 1)]
            if composability == "sqdiff":
                phi = -((q - kv) ** 2)
            elif composability == "absdiff":
                phi = -(q - kv).abs()
            else:
                phi = q * kv
            logits.append((phi + geo[:, a, b].view(1, G, 1, 1)).masked_fill(~ok, float("-inf")))
    return torch.logsumexp(torch.stack(logits), dim=0)


def naive_results(x, q, k, geo, gy, kernel_size, stride, composability):
    """Naive float64 output, lse and autograd gradients of the same inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (x, q, k, geo)]
    y = naive_local_relation(*leaves, kernel_size, stride, composability)
    grads = torch.autograd.grad(y, leaves, gy.double())
    with torch.no_grad():
        lse = naive_lse(*(t.detach() for t in leaves[1:]), kernel_size, stride, composability)
    out = {"y": y.detach(), "lse": lse}
    out.update(zip(("x", "q", "k", "geo"), grads, strict=True))
    return out


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Elementwise |a - e| <= tol * (|e| + max|e|): relative, with a floor at the tensor's scale."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs() / (expected.abs() + scale)).max().item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def make_case(B, C, H, W, G, K, s, dtype=torch.float32, seed=0):
    x, q, k, geo = (t.to(dtype) for t in random_inputs(B, C, H, W, G, K, s, seed=seed))
    Ho, Wo = q.shape[-2:]
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(B, C, Ho, Wo, generator=gen, dtype=torch.float64).to(dtype)
    return x, q, k, geo, gy


# (B, C, H, W, G, K, stride, composability): every (K, stride) pair of {3,5,7,9} x {1,2,3},
# ragged last groups (C not divisible by m), m = 1, images smaller than the window.
CASES = [
    (2, 6, 7, 8, 3, 3, 1, "sqdiff"),
    (1, 9, 7, 9, 3, 3, 2, "absdiff"),
    (1, 3, 9, 7, 1, 3, 3, "mul"),
    (2, 3, 6, 6, 3, 5, 1, "mul"),  # m = 1
    (1, 5, 6, 5, 2, 5, 2, "absdiff"),  # m = 3, last group holds 2
    (2, 10, 8, 9, 4, 5, 3, "sqdiff"),  # m = 3, last group holds 1
    (2, 4, 5, 6, 4, 7, 1, "mul"),  # m = 1
    (1, 4, 5, 5, 2, 7, 2, "absdiff"),  # image smaller than the window
    (1, 8, 10, 6, 2, 7, 3, "absdiff"),
    (1, 7, 4, 3, 3, 9, 1, "sqdiff"),  # m = 3, ragged, image smaller than the window
    (1, 2, 3, 2, 2, 9, 2, "mul"),  # tiny image, m = 1
    (1, 6, 8, 8, 2, 9, 3, "sqdiff"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c))
def test_fp32_matches_naive(lib, case):
    B, C, H, W, G, K, s, comp = case
    x, q, k, geo, gy = make_case(B, C, H, W, G, K, s)
    got = host_local_relation(lib, x, q, k, geo, gy, K, s, comp)
    want = naive_results(x, q, k, geo, gy, K, s, comp)
    for name in ("y", "lse", "x", "q", "k", "geo"):
        assert_close_rel(got[name], want[name], 1e-5, f"{name} ({case})")


@pytest.mark.parametrize("comp", ["sqdiff", "absdiff", "mul"])
def test_fp32_composabilities_ragged_groups(lib, comp):
    x, q, k, geo, gy = make_case(2, 11, 9, 7, 3, 5, 2, seed=3)  # m = 4, last group holds 3
    got = host_local_relation(lib, x, q, k, geo, gy, 5, 2, comp)
    want = naive_results(x, q, k, geo, gy, 5, 2, comp)
    for name in ("y", "lse", "x", "q", "k", "geo"):
        assert_close_rel(got[name], want[name], 1e-5, f"{name} ({comp})")


@pytest.mark.parametrize(("grid", "block", "nchunks"), [(1, 1, 1), (3, 5, 7), (None, 32, 10**6)])
def test_launch_geometry_does_not_change_results(lib, grid, block, nchunks):
    """Grid-stride loops and the grad-geo chunking give the same numbers for any launch."""
    x, q, k, geo, gy = make_case(2, 6, 7, 6, 2, 3, 1, seed=5)
    base = host_local_relation(lib, x, q, k, geo, gy, 3, 1, "sqdiff")
    got = host_local_relation(
        lib, x, q, k, geo, gy, 3, 1, "sqdiff", block=block, grid=grid, nchunks=nchunks
    )
    for name in ("y", "lse", "x", "q", "k"):
        assert torch.equal(got[name], base[name]), name
    assert_close_rel(got["geo"], base["geo"], 1e-6, "geo")


def test_geo_gradient_is_deterministic(lib):
    x, q, k, geo, gy = make_case(2, 8, 9, 9, 2, 7, 1, seed=7)
    runs = [host_local_relation(lib, x, q, k, geo, gy, 7, 1, "mul")["geo"] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("K", "s"), [(3, 1), (5, 2)])
def test_16bit_storage_matches_naive(lib, dtype, K, s):
    x, q, k, geo, gy = make_case(2, 7, 8, 7, 3, K, s, dtype=dtype, seed=11)
    got = host_local_relation(lib, x, q, k, geo, gy, K, s, "sqdiff")
    for name in ("y", "x", "q", "k"):
        assert got[name].dtype == dtype, name
    want = naive_results(x, q, k, geo, gy, K, s, "sqdiff")  # on the 16-bit-rounded inputs
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    for name in ("y", "lse", "x", "q", "k", "geo"):
        assert_close_rel(got[name], want[name], tol, f"{name} ({dtype})")


# ---- the 16-bit conversion helpers of kernels/lr_common.cuh ----------------------------------


def _special_floats() -> torch.Tensor:
    """Values that exercise rounding, subnormals, overflow and specials of fp16 and bf16."""
    gen = torch.Generator().manual_seed(0)
    # every fp32 bit pattern near the fp16 boundaries and a random sample of all of them
    edges = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000,
        0x33000000, 0x33000001, 0x337FFFFF, 0x33800000, 0x38800000, 0x387FFFFF,
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000, 0x00000001, 0x007FFFFF,
    ]  # fmt: skip
    near = []
    for e in edges:
        near.extend(range(max(e - 3, 0), min(e + 4, 2**32)))
    halves = torch.arange(0, 2**16, dtype=torch.int64)
    ties = (halves << 13) | (1 << 12)  # exactly half-way between two fp16 mantissas
    ties_bf16 = (halves << 16) | (1 << 15)
    bits = torch.cat(
        [
            torch.tensor(near, dtype=torch.int64),
            ties,
            ties | (1 << 31),
            ties_bf16 & 0xFFFFFFFF,
            torch.randint(0, 2**32, (200_000,), generator=gen, dtype=torch.int64),
        ]
    )
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).contiguous()


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "half"), (torch.bfloat16, "bf16")])
def test_float_to_16bit_matches_torch(lib, dtype, name):
    values = _special_floats()
    out = torch.empty(values.shape, dtype=torch.int16)
    getattr(lib, f"lr_host_float_to_{name}")(
        _ptr(values), _ptr(out), ctypes.c_longlong(values.numel())
    )
    want = values.to(dtype).view(torch.int16)
    got_f = out.view(dtype).float()
    nan = torch.isnan(values)
    assert torch.isnan(got_f[nan]).all()
    assert torch.equal(out[~nan], want[~nan])


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "half"), (torch.bfloat16, "bf16")])
def test_16bit_to_float_matches_torch_for_every_pattern(lib, dtype, name):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out = torch.empty(bits.shape, dtype=torch.float32)
    getattr(lib, f"lr_host_{name}_to_float")(_ptr(bits), _ptr(out), ctypes.c_longlong(bits.numel()))
    want = bits.view(dtype).float()
    nan = torch.isnan(want)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))


# ---- the cupy backend's Python side, driven by the host-built kernels ------------------------


class _HostKernel:
    """Stands in for a cupy RawKernel: ``fn((grid,), (block,), args)`` runs the host build."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, grid, block, args) -> None:
        import numpy as np

        def convert(a):
            if isinstance(a, np.uint64):
                return ctypes.c_void_p(int(a))
            if isinstance(a, np.int64):
                return ctypes.c_longlong(int(a))
            assert isinstance(a, np.int32), type(a)
            return ctypes.c_int(int(a))

        self.calls += 1
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *map(convert, args))


@pytest.fixture
def host_backend(lib, monkeypatch):
    """robustlr.ops.cupy_backend with its kernels and launch context replaced by the host build."""
    import contextlib

    from robustlr.ops import cupy_backend

    tags = {"float": "f32", "lr_half": "f16", "lr_bf16": "bf16"}

    def get_kernels(device_index, ctype, kernel_size, stride):
        assert device_index == 0
        suffix = f"{tags[ctype]}_k{kernel_size}_s{stride}"
        return cupy_backend.CupyKernels(
            *(_HostKernel(getattr(lib, f"lr_host_{k}_{suffix}")) for k in ("forward",
              "backward_query", "backward_input"))
        )  # fmt: skip

    monkeypatch.setattr(cupy_backend, "get_kernels", get_kernels)
    monkeypatch.setattr(cupy_backend, "_launch_context", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cupy_backend, "_QUERY_THREADS", 7)  # several positions per thread
    return cupy_backend


def _backend_run(backend, x, q, k, geo, gy, K, s, comp, needs=(True, True, True, True)):
    from robustlr.ops.contract import check_inputs

    shape = check_inputs(x, q, k, geo, K, s, comp)
    leaves = [
        t.detach().clone().requires_grad_(n) for t, n in zip((x, q, k, geo), needs, strict=True)
    ]
    y = backend._LocalRelationCupy.apply(*leaves, shape, comp)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, gy))
    return [y.detach()] + [next(grads) if t.requires_grad else None for t in leaves]


@pytest.mark.parametrize("comp", ["sqdiff", "absdiff", "mul"])
def test_backend_function_with_host_kernels(host_backend, comp):
    x, q, k, geo, gy = make_case(2, 10, 8, 9, 4, 5, 3, seed=13)
    got = _backend_run(host_backend, x, q, k, geo, gy, 5, 3, comp)
    want = naive_results(x, q, k, geo, gy, 5, 3, comp)
    for name, a in zip(("y", "x", "q", "k", "geo"), got, strict=True):
        assert a.dtype == torch.float32
        assert_close_rel(a, want[name], 1e-5, f"{name} ({comp})")


def test_backend_strided_inputs_and_partial_grads(host_backend):
    x, q, k, geo, gy = make_case(2, 6, 7, 8, 3, 3, 1, seed=17)
    want = naive_results(x, q, k, geo, gy, 3, 1, "sqdiff")
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, q, k, gy)]
    geo_t = geo.transpose(1, 2).contiguous().transpose(1, 2)
    assert not cl[0].is_contiguous() and not geo_t.is_contiguous()
    got = _backend_run(host_backend, *cl[:3], geo_t, cl[3], 3, 1, "sqdiff")
    for name, a in zip(("y", "x", "q", "k", "geo"), got, strict=True):
        assert_close_rel(a, want[name], 1e-5, name)
    for needs in [(True, False, False, False), (False, False, False, True)]:
        got = _backend_run(host_backend, x, q, k, geo, gy, 3, 1, "sqdiff", needs)
        for name, a, n in zip(("x", "q", "k", "geo"), got[1:], needs, strict=True):
            if n:
                assert_close_rel(a, want[name], 1e-5, f"{name} only")
            else:
                assert a is None


def test_backend_mixed_dtypes_and_refusals(host_backend):
    x, q, k, geo, gy = make_case(2, 7, 8, 7, 3, 5, 2, dtype=torch.bfloat16, seed=19)
    geo32 = geo.float()
    got = _backend_run(host_backend, x, q, k, geo32, gy, 5, 2, "mul")
    assert [t.dtype for t in got] == [torch.bfloat16] * 4 + [torch.float32]
    want = naive_results(x, q, k, geo32, gy, 5, 2, "mul")
    for name, a in zip(("y", "x", "q", "k", "geo"), got, strict=True):
        assert_close_rel(a, want[name], 2e-2, name)
    x64, q64, k64, geo64, _ = make_case(1, 4, 5, 5, 2, 3, 1, dtype=torch.float64)
    from robustlr.ops.contract import check_inputs

    shape = check_inputs(x64, q64, k64, geo64, 3, 1, "sqdiff")
    with pytest.raises(TypeError, match="reference"):
        host_backend._LocalRelationCupy.apply(x64, q64, k64, geo64, shape, "sqdiff")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        host_backend.local_relation_cupy(x64.float(), q64, k64, geo64, shape, "sqdiff")
