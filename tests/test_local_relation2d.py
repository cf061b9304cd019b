"""LocalRelation2d: shapes, the layer's composition, priors and knobs."""

from __future__ import annotations

import pytest
import torch
from lr_naive import naive_local_relation

from robustlr.nn import LocalRelation2d
from robustlr.nn.local_relation2d import relative_positions


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("prior", ["mlp", "direct", "none"])
def test_layer_equals_projections_then_naive_op_then_1x1(stride, prior):
    torch.manual_seed(0)
    layer = LocalRelation2d(12, kernel_size=5, stride=stride, m=5, geometric_prior=prior).double()
    if prior == "direct":
        torch.nn.init.normal_(layer.geometric_prior.logits)
    x = torch.randn(2, 12, 9, 10, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 12, (9 - 1) // stride + 1, (10 - 1) // stride + 1)

    q = torch.nn.functional.conv2d(x, layer.query.weight)[:, :, ::stride, ::stride]
    k = torch.nn.functional.conv2d(x, layer.key.weight)
    geo = layer.prior_logits(torch.float64, x.device)
    if prior == "none":
        assert not geo.any()
    agg = naive_local_relation(x, q, k, geo, 5, stride)
    want = torch.nn.functional.conv2d(agg, layer.project.weight)
    torch.testing.assert_close(y, want)


def test_groups_follow_channel_sharing():
    assert LocalRelation2d(100, m=8).groups == 13  # the paper's width 100
    assert LocalRelation2d(64, m=8).groups == 8
    assert LocalRelation2d(10, m=1).groups == 10


def test_prior_parameters_are_exactly_what_geometric_prior_none_removes():
    with_mlp = LocalRelation2d(64, geometric_prior="mlp")
    without = LocalRelation2d(64, geometric_prior="none")
    direct = LocalRelation2d(64, geometric_prior="direct")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(with_mlp) - count(without) == count(with_mlp.geometric_prior)
    assert count(direct) - count(without) == 8 * 7 * 7
    assert count(without) == 2 * 64 * 8 + 64 * 64  # query, key, 1x1 after aggregation


def test_relative_positions_span_minus_one_to_one():
    grid = relative_positions(7)
    assert grid.shape == (2, 7, 7)
    assert grid[0, 0, 3] == -1 and grid[0, 6, 3] == 1 and grid[1, 3, 0] == -1
    assert grid[:, 3, 3].abs().sum() == 0


def test_every_parameter_gets_a_gradient():
    layer = LocalRelation2d(16, kernel_size=3, m=4, qk_dim=2, composability="mul")
    layer(torch.randn(2, 16, 6, 6)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"composability": "dot"},
        {"geometric_prior": "learned"},
        {"kernel_size": 4},
        {"m": 0},
    ],
)
def test_bad_options_are_clear_errors(kwargs):
    with pytest.raises(ValueError, match="must be"):
        LocalRelation2d(8, **kwargs)
