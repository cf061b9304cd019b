"""How LR-Net starts: the properties the LR-Net training fix relies on (docs/lrnet-training.md).

- every geometric prior (mlp and direct) starts peaked at the window centre, with a different
  sharpness per group, so the aggregation is neither a uniform average over the window nor the
  same blur in every group;
- the 1x1 after aggregation starts with He (fan-out) init like the network's other channel
  transformations;
- the query/key projections are the parameters the engine puts at a scaled learning rate.
"""

from __future__ import annotations

import math

import pytest
import torch

from robustlr.models import create_model, list_models
from robustlr.nn import LocalRelation2d, relation_parameters
from robustlr.nn.local_relation2d import (
    PRIOR_SHARPNESS,
    DirectGeometricPrior,
    GeometricPrior,
    centre_prior_logits,
)
from robustlr.train.param_groups import parameter_groups

LRNETS = [name for name in list_models() if name.startswith("lrnet")]


def window_entropy_ratio(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over a whole window / log(K*K), per group. Shape: (G,)."""
    weights = logits.flatten(1).softmax(1)
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(1)
    return entropy / math.log(logits[0].numel())


@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9])
def test_mlp_prior_starts_exactly_at_the_centre_peaked_target(kernel_size):
    torch.manual_seed(0)
    prior = GeometricPrior(13, kernel_size)
    want = centre_prior_logits(13, kernel_size)
    torch.testing.assert_close(prior(), want)
    direct = DirectGeometricPrior(13, kernel_size)
    torch.testing.assert_close(direct(), want)


def test_centre_prior_peaks_at_the_centre_with_per_group_sharpness():
    logits = centre_prior_logits(8, 7)
    for group in logits:
        assert group.flatten().argmax().item() == 24  # the centre of 7 x 7
        assert group[3, 3] == 0
    # one pixel right of the centre: -s_g, spread log-uniformly over PRIOR_SHARPNESS
    step = -logits[:, 3, 4]
    torch.testing.assert_close(step[0], torch.tensor(PRIOR_SHARPNESS[0]))
    torch.testing.assert_close(step[-1], torch.tensor(PRIOR_SHARPNESS[1]))
    assert (step.diff() > 0).all()
    ratio = window_entropy_ratio(logits)
    # from a broad blur (0.93 of a uniform window's entropy) to nearly the centre alone (0.21)
    assert ratio.max() < 0.95 and ratio.min() < 0.25 and ratio.mean() < 0.7


def test_default_prior_init_is_the_old_near_uniform_start():
    torch.manual_seed(0)
    ratio = window_entropy_ratio(GeometricPrior(8, 7, init="default")())
    assert (ratio > 0.95).all()
    assert not DirectGeometricPrior(8, 7, init="default")().any()
    with pytest.raises(ValueError, match="prior_init"):
        LocalRelation2d(16, prior_init="gaussian")


@pytest.mark.parametrize("arch", LRNETS)
def test_every_lr_layer_of_every_lrnet_starts_local_and_diverse(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, small_input=True, width=0.25)
    layers = [m for m in model.modules() if isinstance(m, LocalRelation2d)]
    assert layers
    for layer in layers:
        logits = layer.prior_logits(torch.float32, torch.device("cpu")).detach()
        torch.testing.assert_close(logits, centre_prior_logits(layer.groups, layer.kernel_size))
        fan_out = layer.project.weight.shape[0]
        assert layer.project.weight.std().item() == pytest.approx(
            math.sqrt(2.0 / fan_out), rel=0.25
        )


def test_parameter_groups_scale_exactly_the_query_and_key_weights():
    model = create_model("lrnet26", num_classes=10, small_input=True, width=0.25)
    groups = parameter_groups(model, 0.1, 0.25)
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(0.025)]
    relation = {id(p) for p in groups[1]["params"]}
    assert relation == {id(p) for p in relation_parameters(model)}
    layers = [m for m in model.modules() if isinstance(m, LocalRelation2d)]
    assert len(relation) == 2 * len(layers)
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each exactly once

    resnet = create_model("resnet26", num_classes=10, small_input=True, width=0.25)
    assert len(parameter_groups(resnet, 0.1, 0.25)) == 1
