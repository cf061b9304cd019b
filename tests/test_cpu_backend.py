"""The compiled CPU backend against the naive float64 loop, gradcheck and the reference."""

from __future__ import annotations

import logging

import pytest
import torch
from lr_naive import (
    COMPOSABILITIES,
    SHAPES,
    naive_local_relation,
    output_and_grads,
    random_inputs,
)

from robustlr.ops import BACKEND_ENV, cpu_backend, local_relation, resolve_backend


def _cpu(*t, **kw):
    return local_relation(*t, backend="cpu", **kw)


@pytest.mark.parametrize("composability", COMPOSABILITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_naive_loop(shape, composability):
    B, C, H, W, G, K, s = shape
    inputs = random_inputs(B, C, H, W, G, K, s, seed=hash(shape) % 1000 + 1)
    grad_out = torch.randn(B, C, (H - 1) // s + 1, (W - 1) // s + 1, dtype=torch.float64)
    y_ref, g_ref = output_and_grads(
        lambda *t: naive_local_relation(*t, K, s, composability), inputs, grad_out
    )
    y, g = output_and_grads(
        lambda *t: _cpu(*t, kernel_size=K, stride=s, composability=composability),
        inputs,
        grad_out,
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("xqkg", g, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("composability", COMPOSABILITIES)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck(composability, stride):
    x, q, k, geo = random_inputs(2, 5, 6, 5, 2, 3, stride, seed=stride + 7)
    if composability == "absdiff":  # keep |q - k| away from its kink at 0
        q = q + 0.05 * torch.sign(q)
    inputs = tuple(t.requires_grad_(True) for t in (x, q, k, geo))
    assert torch.autograd.gradcheck(
        lambda *t: _cpu(*t, kernel_size=3, stride=stride, composability=composability), inputs
    )


@pytest.mark.parametrize("composability", COMPOSABILITIES)
@pytest.mark.parametrize("shape", [(3, 20, 11, 13, 3, 7, 1), (2, 17, 12, 9, 3, 5, 2)])
def test_float32_equals_the_reference_backend(shape, composability):
    B, C, H, W, G, K, s = shape
    inputs = [t.float() for t in random_inputs(B, C, H, W, G, K, s, seed=21)]
    inputs[1].mul_(1.5)  # a wide spread of logits
    grad_out = torch.randn(B, C, (H - 1) // s + 1, (W - 1) // s + 1)
    results = {
        name: output_and_grads(
            lambda *t, name=name: local_relation(
                *t, kernel_size=K, stride=s, composability=composability, backend=name
            ),
            inputs,
            grad_out,
        )
        for name in ("reference", "cpu")
    }
    (y_ref, g_ref), (y, g) = results["reference"], results["cpu"]
    for name, got, want in zip("yxqkg", (y, *g), (y_ref, *g_ref), strict=True):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    x, q, k, geo = random_inputs(2, 16, 8, 8, 2, 7, 1, seed=5)
    want = naive_local_relation(x, q, k, geo, 7, 1)
    args = [t.to(dtype).requires_grad_(True) for t in (x, q, k, geo)]
    y = _cpu(*args, kernel_size=7)
    assert y.dtype == dtype
    rel = (y.double() - want).norm() / want.norm()
    assert rel < {torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    y.float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == dtype for a in args)


def test_non_contiguous_inputs_and_partial_gradients():
    x, q, k, geo = random_inputs(2, 8, 9, 9, 2, 5, 2, seed=11)
    y = _cpu(x, q, k, geo, kernel_size=5, stride=2)
    x_cl = x.to(memory_format=torch.channels_last)
    k_nc = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert not k_nc.is_contiguous()
    torch.testing.assert_close(_cpu(x_cl, q, k_nc, geo, kernel_size=5, stride=2), y)
    xg = x.clone().requires_grad_(True)  # only x needs a gradient
    _cpu(xg, q, k, geo, kernel_size=5, stride=2).sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_weights_ignore_out_of_image_neighbours():
    x, q, k, geo = random_inputs(1, 4, 6, 6, 2, 7, 1, seed=2)
    y = _cpu(torch.full_like(x, 3.0), q, k, geo, kernel_size=7)
    torch.testing.assert_close(y, torch.full_like(y, 3.0))


def test_backward_is_deterministic():
    inputs = [t.float() for t in random_inputs(4, 24, 10, 10, 3, 7, 1, seed=8)]
    grad_out = torch.randn(4, 24, 10, 10)
    _, g1 = output_and_grads(lambda *t: _cpu(*t, kernel_size=7), inputs, grad_out)
    _, g2 = output_and_grads(lambda *t: _cpu(*t, kernel_size=7), inputs, grad_out)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.device("cpu"), dtype=torch.float32) == "cpu"
    assert resolve_backend(torch.device("cpu"), qk_dim=2) == "reference"
    with pytest.raises(RuntimeError, match="qk_dim = 1 only"):
        resolve_backend(torch.device("cpu"), "cpu", qk_dim=2)
    with pytest.raises(RuntimeError, match="CPU tensors"):
        resolve_backend(torch.device("cuda", 0), "cpu")


@pytest.fixture
def broken_build(monkeypatch):
    """A machine where the kernels cannot be built (e.g. no C++ compiler)."""

    def fail() -> None:
        raise OSError("no C++ compiler found (simulated)")

    monkeypatch.setattr(cpu_backend, "build_library", fail)
    cpu_backend._load_once.cache_clear()
    yield
    cpu_backend._load_once.cache_clear()  # the next test loads the real library again


def test_build_failure_falls_back_to_reference_with_one_warning(broken_build, monkeypatch, caplog):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    x, q, k, geo = random_inputs(1, 6, 7, 7, 2, 5, 1, seed=4)
    want = local_relation(x, q, k, geo, kernel_size=5, backend="reference")
    with caplog.at_level(logging.WARNING, logger="robustlr"):
        assert resolve_backend(torch.device("cpu")) == "reference"
        for _ in range(3):
            torch.testing.assert_close(local_relation(x, q, k, geo, kernel_size=5), want)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "no C++ compiler found" in warnings[0].getMessage()
    assert "'reference'" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="could not be built"):
        local_relation(x, q, k, geo, kernel_size=5, backend="cpu")
