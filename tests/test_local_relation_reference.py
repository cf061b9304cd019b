"""The reference backend against the naive float64 loop of tests/lr_naive.py."""

from __future__ import annotations

import pytest
import torch
from lr_naive import (
    COMPOSABILITIES,
    SHAPES,
    naive_local_relation,
    output_and_grads,
    random_inputs,
)

from robustlr.ops import BACKEND_ENV, local_relation


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests specify the reference backend (the automatic choice on CPU is 'cpu')."""
    monkeypatch.setenv(BACKEND_ENV, "reference")


@pytest.mark.parametrize("composability", COMPOSABILITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_naive_loop(shape, composability):
    B, C, H, W, G, K, s = shape
    inputs = random_inputs(B, C, H, W, G, K, s, seed=hash(shape) % 1000)
    grad_out = torch.randn(B, C, (H - 1) // s + 1, (W - 1) // s + 1, dtype=torch.float64)

    y_ref, g_ref = output_and_grads(
        lambda *t: naive_local_relation(*t, K, s, composability), inputs, grad_out
    )
    y, g = output_and_grads(
        lambda *t: local_relation(*t, kernel_size=K, stride=s, composability=composability),
        inputs,
        grad_out,
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("xqk", g[:3], g_ref[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"grad {name}")
    torch.testing.assert_close(g[3], g_ref[3], rtol=1e-9, atol=1e-10, msg="grad geo")


@pytest.mark.slow
@pytest.mark.parametrize("composability", COMPOSABILITIES)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck(composability, stride):
    x, q, k, geo = random_inputs(1, 6, 5, 6, 2, 3, stride, seed=stride)
    if composability == "absdiff":  # keep |q - k| away from its kink at 0
        q = q + 0.05 * torch.sign(q)
    inputs = tuple(t.requires_grad_(True) for t in (x, q, k, geo))
    assert torch.autograd.gradcheck(
        lambda *t: local_relation(*t, kernel_size=3, stride=stride, composability=composability),
        inputs,
    )


def test_vector_query_and_key_sum_over_qk_dim():
    B, C, H, W, G, K, s, D = 2, 6, 5, 5, 2, 3, 1, 3
    inputs = random_inputs(B, C, H, W, G, K, s, qk_dim=D, seed=3)
    grad_out = torch.randn(B, C, H, W, dtype=torch.float64)
    y_ref, g_ref = output_and_grads(
        lambda *t: naive_local_relation(*t, K, s, qk_dim=D), inputs, grad_out
    )
    y, g = output_and_grads(
        lambda *t: local_relation(*t, kernel_size=K, qk_dim=D), inputs, grad_out
    )
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    x, q, k, geo = random_inputs(2, 16, 8, 8, 2, 7, 1, seed=5)
    want = naive_local_relation(x, q, k, geo, 7, 1)
    args = [t.to(dtype).requires_grad_(True) for t in (x, q, k, geo)]
    y = local_relation(*args, kernel_size=7)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    rel = (y.double() - want).norm() / want.norm()
    assert rel < tol
    y.float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == dtype for a in args)


def test_channels_last_and_non_contiguous_inputs_give_the_same_result():
    x, q, k, geo = random_inputs(2, 8, 9, 9, 2, 5, 2, seed=11)
    y = local_relation(x, q, k, geo, kernel_size=5, stride=2)
    x_cl = x.to(memory_format=torch.channels_last)
    k_nc = k.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not k_nc.is_contiguous()
    torch.testing.assert_close(local_relation(x_cl, q, k_nc, geo, kernel_size=5, stride=2), y)


def test_weights_ignore_out_of_image_neighbours():
    # A constant image aggregates to itself everywhere, borders included, whatever q, k and geo:
    # zero padding would pull border outputs towards 0.
    x, q, k, geo = random_inputs(1, 4, 6, 6, 2, 7, 1, seed=2)
    y = local_relation(torch.full_like(x, 3.0), q, k, geo, kernel_size=7)
    torch.testing.assert_close(y, torch.full_like(y, 3.0))


def test_memory_frugal_backward_saves_no_window_copies():
    # Saved tensors: x, q, k, geo, the (group-padded) output and the log-sum-exp; nothing K*K big.
    x, q, k, geo = (t.float().requires_grad_(True) for t in random_inputs(1, 16, 12, 12, 2, 7, 1))
    y = local_relation(x, q, k, geo, kernel_size=7)
    saved = y.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) <= 2.5 * x.numel() + 3 * k.numel() + geo.numel()


@pytest.mark.parametrize("composability", COMPOSABILITIES)
def test_benchmark_unfold_baseline_computes_the_same_function(composability):
    from robustlr.bench.unfold_baseline import unfold_local_relation

    x, q, k, geo = random_inputs(2, 10, 7, 6, 3, 5, 2, seed=4)
    want = naive_local_relation(x, q, k, geo, 5, 2, composability)
    torch.testing.assert_close(unfold_local_relation(x, q, k, geo, 5, 2, composability), want)


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3])
@pytest.mark.parametrize("composability", COMPOSABILITIES)
@pytest.mark.parametrize(
    "shape",
    [(2, 5, 6, 7, 2, 7, 1, 1), (1, 6, 9, 8, 3, 5, 2, 2)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_window_split_into_row_chunks_matches_naive_loop(
    monkeypatch, shape, composability, rows_per_chunk
):
    # Large inputs walk the window a few rows at a time (an online softmax across the chunks);
    # force that path on small inputs, the centre row's chunk first or not.
    import robustlr.ops.reference as reference

    monkeypatch.setattr(reference, "rows_per_chunk_for", lambda *_: rows_per_chunk)
    B, C, H, W, G, K, s, D = shape
    inputs = random_inputs(B, C, H, W, G, K, s, qk_dim=D, seed=rows_per_chunk)
    inputs[1].mul_(2.0)  # spread the logits so the running max changes between chunks
    grad_out = torch.randn(B, C, (H - 1) // s + 1, (W - 1) // s + 1, dtype=torch.float64)
    y_ref, g_ref = output_and_grads(
        lambda *t: naive_local_relation(*t, K, s, composability, qk_dim=D), inputs, grad_out
    )
    y, g = output_and_grads(
        lambda *t: local_relation(
            *t, kernel_size=K, stride=s, composability=composability, qk_dim=D
        ),
        inputs,
        grad_out,
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("xqkg", g, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"grad {name}")
