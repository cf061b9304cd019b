"""The CuPy backend against the exact reference backend (needs a CUDA GPU and CuPy).

Run with ``pytest -m cuda`` on a GPU machine; skipped by default (pyproject addopts) and, with a
reason, wherever CUDA or CuPy is missing.
"""

from __future__ import annotations

import math

import pytest
import torch

from robustlr.ops import local_relation

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
cupy = pytest.importorskip("cupy", reason="the cupy backend needs CuPy (robustlr[cuda13])")

from lr_naive import assert_close_rel  # noqa: E402

from robustlr.ops import cupy_backend  # noqa: E402

COMPS = ("sqdiff", "absdiff", "mul")


def make_inputs(B, C, H, W, G, K, s, dtype=torch.float32, device="cuda", seed=0):
    """Random x, q, k, geo and an upstream gradient, on ``device`` in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    shapes = [(B, C, H, W), (B, G, Ho, Wo), (B, G, H, W), (G, K, K), (B, C, Ho, Wo)]
    return [torch.randn(*sh, generator=gen).to(device=device, dtype=dtype) for sh in shapes]


def run(x, q, k, geo, gy, K, s, comp, backend):
    """Output and the four gradients of one call. Shape: as local_relation."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, q, k, geo)]
    y = local_relation(*leaves, kernel_size=K, stride=s, composability=comp, backend=backend)
    grads = torch.autograd.grad(y, leaves, gy)
    return [y.detach(), *grads]


def exact(x, q, k, geo, gy, K, s, comp):
    """The reference backend in float64 on the same (already rounded) inputs."""
    return run(*(t.double() for t in (x, q, k, geo, gy)), K, s, comp, "reference")


def check_against_exact(inputs, K, s, comp, tol, what=""):
    got = run(*inputs, K, s, comp, "cupy")
    want = exact(*inputs, K, s, comp)
    for name, a, e in zip(("y", "x", "q", "k", "geo"), got, want, strict=True):
        assert_close_rel(a, e, tol, f"{name} {what}")
    return got


SHAPES = [
    # (B, C, H, W, G, K, stride)
    (2, 6, 7, 8, 3, 3, 1),
    (1, 9, 7, 9, 3, 3, 2),
    (2, 3, 9, 7, 1, 3, 3),
    (2, 3, 6, 6, 3, 5, 1),  # m = 1
    (1, 5, 6, 5, 2, 5, 2),  # ragged last group
    (2, 10, 8, 9, 4, 5, 3),  # ragged last group
    (2, 4, 5, 6, 4, 7, 1),  # image smaller than the window
    (2, 100, 15, 13, 13, 7, 1),  # the paper's width 100, m = 8, G = 13
    (2, 100, 15, 13, 13, 7, 2),
    (1, 8, 10, 6, 2, 7, 3),
    (1, 7, 4, 3, 3, 9, 1),
    (1, 2, 3, 2, 2, 9, 2),
    (1, 16, 12, 12, 2, 9, 3),
    (3, 64, 20, 20, 8, 7, 1),  # more positions than one block
    # lr_forward_packed: 8 + 3 images of a group per block, 60 KB of dynamic shared memory (the
    # launch opts in above 48 KB)
    (11, 64, 7, 7, 8, 7, 1),
    # lr_forward_pairs: 2 + 1 images of 14 x 14 (LR-Net-26's stage 3) per group; at K = 13,
    # 58 KB of dynamic shared memory
    (3, 64, 14, 14, 8, 7, 1),
    (3, 8, 6, 8, 2, 13, 1),
]


@pytest.mark.parametrize("comp", COMPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}G{}K{}s{}".format(*s))
def test_fp32_matches_reference(shape, comp):
    *sizes, K, s = shape
    check_against_exact(make_inputs(*sizes, K, s), K, s, comp, 1e-5, f"{shape} {comp}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("comp", COMPS)
@pytest.mark.parametrize("shape", [(2, 12, 9, 10, 3, 3, 1), (2, 100, 15, 13, 13, 7, 2)])
def test_16bit_matches_reference(shape, comp, dtype):
    *sizes, K, s = shape
    inputs = make_inputs(*sizes, K, s, dtype=dtype)
    got = check_against_exact(inputs, K, s, comp, 1e-2, f"{shape} {comp} {dtype}")
    for t in got[:4]:
        assert t.dtype == dtype


def test_mixed_dtypes_give_gradients_in_each_input_dtype():
    x, q, k, geo, gy = make_inputs(2, 12, 9, 10, 3, 5, 1, dtype=torch.float16)
    geo = geo.float()  # a parameter kept in fp32 under autocast
    y, gx, gq, gk, ggeo = run(x, q, k, geo, gy, 5, 1, "sqdiff", "cupy")
    assert (y.dtype, gx.dtype, gq.dtype, gk.dtype, ggeo.dtype) == (torch.float16,) * 4 + (
        torch.float32,
    )
    want = exact(x, q, k, geo, gy, 5, 1, "sqdiff")
    for name, a, e in zip(("y", "x", "q", "k", "geo"), (y, gx, gq, gk, ggeo), want, strict=True):
        assert_close_rel(a, e, 1e-2, name)


def test_channels_last_inputs():
    K, s = 7, 2
    x, q, k, geo, gy = make_inputs(2, 24, 11, 9, 3, K, s)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, q, k)]
    assert not cl[0].is_contiguous()
    got = run(*cl, geo, gy.contiguous(memory_format=torch.channels_last), K, s, "sqdiff", "cupy")
    want = exact(x, q, k, geo, gy, K, s, "sqdiff")
    for name, a, e in zip(("y", "x", "q", "k", "geo"), got, want, strict=True):
        assert_close_rel(a, e, 1e-5, name)


def test_non_contiguous_inputs():
    K, s = 5, 1
    x, q, k, geo, gy = make_inputs(2, 12, 8, 9, 3, K, s)
    xs = torch.cat([x, torch.randn_like(x)], dim=1)[:, ::2]  # channel stride 2
    qs = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    ks = torch.cat([k, k], dim=3)[..., : k.shape[3]]  # row stride 2W
    geos = geo.transpose(1, 2).contiguous().transpose(1, 2)
    gys = gy.transpose(2, 3).contiguous().transpose(2, 3)
    assert not any(t.is_contiguous() for t in (xs, qs, ks, geos, gys))
    got = run(xs, qs, ks, geos, gys, K, s, "absdiff", "cupy")
    want = exact(xs.contiguous(), q, k, geo, gy, K, s, "absdiff")
    for name, a, e in zip(("y", "x", "q", "k", "geo"), got, want, strict=True):
        assert_close_rel(a, e, 1e-5, name)


def test_runs_on_the_current_non_default_stream():
    """Inputs produced late on a side stream: a launch on another stream would read garbage."""
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available to delay the side stream")
    K, s = 7, 1
    x, q, k, geo, gy = make_inputs(2, 32, 16, 16, 4, K, s)
    want = exact(x, q, k, geo, gy, K, s, "sqdiff")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy for a while
        late = [t * 1.0 for t in (x, q, k, geo, gy)]  # fresh tensors written after the sleep
        assert torch.cuda.current_stream() == side
        got = run(*late, K, s, "sqdiff", "cupy")
    side.synchronize()
    for name, a, e in zip(("y", "x", "q", "k", "geo"), got, want, strict=True):
        assert_close_rel(a, e, 1e-5, name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device():
    K, s = 5, 2
    torch.cuda.set_device(0)
    cupy_backend.get_kernels.cache_clear()
    inputs = make_inputs(2, 12, 9, 10, 3, K, s, device="cuda:1")
    got = check_against_exact(inputs, K, s, "mul", 1e-5, "cuda:1")
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert torch.cuda.current_device() == 0
    misses = cupy_backend.get_kernels.cache_info().misses
    cupy_backend.get_kernels(1, "float", K, s)  # compiled for device 1 above: a cache hit
    assert cupy_backend.get_kernels.cache_info().misses == misses
    # the same configuration on device 0 is compiled (and loaded) separately
    check_against_exact(make_inputs(2, 12, 9, 10, 3, K, s), K, s, "mul", 1e-5, "cuda:0")
    assert cupy_backend.get_kernels.cache_info().misses == misses + 1


def test_compiled_kernels_are_cached():
    cupy_backend.get_kernels.cache_clear()
    K, s = 3, 2
    inputs = make_inputs(1, 6, 7, 7, 2, K, s)
    run(*inputs, K, s, "sqdiff", "cupy")  # forward + backward: one compilation
    info = cupy_backend.get_kernels.cache_info()
    assert (info.misses, info.currsize) == (1, 1)
    run(*inputs, K, s, "mul", "cupy")  # the composability is a runtime argument
    run(*make_inputs(2, 9, 12, 5, 3, K, s), K, s, "absdiff", "cupy")  # other sizes
    info = cupy_backend.get_kernels.cache_info()
    assert (info.misses, info.currsize) == (1, 1)
    assert info.hits >= 5
    first = cupy_backend.get_kernels(torch.cuda.current_device(), "float", K, s)
    assert cupy_backend.get_kernels(torch.cuda.current_device(), "float", K, s) is first
    run(*make_inputs(1, 6, 7, 7, 2, K, s, dtype=torch.float16), K, s, "sqdiff", "cupy")
    assert cupy_backend.get_kernels.cache_info().misses == 2  # a new dtype compiles once


def test_geo_gradient_is_deterministic():
    K, s = 7, 1
    inputs = make_inputs(4, 64, 20, 20, 8, K, s)
    first = run(*inputs, K, s, "sqdiff", "cupy")
    second = run(*inputs, K, s, "sqdiff", "cupy")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_only_some_gradients_requested():
    K, s = 5, 1
    x, q, k, geo, gy = make_inputs(2, 12, 8, 9, 3, K, s)
    want = exact(x, q, k, geo, gy, K, s, "sqdiff")
    xr = x.clone().requires_grad_()
    y = local_relation(xr, q, k, geo, kernel_size=K, stride=s, backend="cupy")
    (gx,) = torch.autograd.grad(y, [xr], gy)
    assert_close_rel(gx, want[1], 1e-5, "x only")
    georr = geo.clone().requires_grad_()
    y = local_relation(x, q, k, georr, kernel_size=K, stride=s, backend="cupy")
    (ggeo,) = torch.autograd.grad(y, [georr], gy)
    assert_close_rel(ggeo, want[4], 1e-5, "geo only")


def test_empty_batch():
    K, s = 3, 1
    x, q, k, geo, gy = make_inputs(0, 6, 5, 5, 2, K, s)
    y, gx, gq, gk, ggeo = run(x, q, k, geo, gy, K, s, "sqdiff", "cupy")
    assert y.shape == (0, 6, 5, 5)
    assert (gx.shape, gq.shape, gk.shape) == (x.shape, q.shape, k.shape)
    assert torch.equal(ggeo, torch.zeros_like(geo))


def test_float64_is_refused_with_a_pointer_to_the_reference_backend():
    x, q, k, geo, _ = make_inputs(1, 4, 5, 5, 2, 3, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="reference"):
        local_relation(x, q, k, geo, kernel_size=3, backend="cupy")


def test_automatic_backend_is_cupy_on_cuda(monkeypatch):
    calls = []
    real = cupy_backend.local_relation_cupy

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.delenv("ROBUSTLR_LR_BACKEND", raising=False)
    monkeypatch.setattr(cupy_backend, "local_relation_cupy", spy)
    x, q, k, geo, _ = make_inputs(1, 4, 5, 5, 2, 3, 1)
    local_relation(x, q, k, geo, kernel_size=3)
    assert calls == [1]


def test_larger_shape_smoke():
    """A layer-sized call (LR-Net-50 res2: width 100, 56x56, K = 7) agrees with the reference."""
    K, s = 7, 1
    inputs = make_inputs(2, 100, 56, 56, 13, K, s)
    y = local_relation(*inputs[:4], kernel_size=K, stride=s, backend="cupy")
    want = local_relation(*(t.double() for t in inputs[:4]), kernel_size=K, backend="reference")
    assert_close_rel(y, want, 1e-5, "y")
    assert math.isfinite(y.float().sum().item())
