"""How LR-Net starts: the properties the LR-Net training fix relies on (docs/lrnet-training.md).

- every geometric prior (mlp and direct) starts peaked, with a different sharpness per group,
  so the aggregation is neither a uniform average over the window nor the same blur in every
  group; under the default "shift" init the groups peak at the centre and its 8 neighbours in
  turn, so each starts as a nearly pure one-pixel shift;
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
    DEFAULT_PRIOR_INIT,
    PRIOR_SHARPNESS,
    SHIFT_PEAKS,
    DirectGeometricPrior,
    GeometricPrior,
    peaked_prior_logits,
)
from robustlr.train.param_groups import parameter_groups

LRNETS = [name for name in list_models() if name.startswith("lrnet")]


def window_entropy_ratio(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over a whole window / log(K*K), per group. Shape: (G,)."""
    weights = logits.flatten(1).softmax(1)
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(1)
    return entropy / math.log(logits[0].numel())


@pytest.mark.parametrize("init", ["shift", "centre"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
def test_priors_start_exactly_at_the_peaked_target(kernel_size, init):
    torch.manual_seed(0)
    want = peaked_prior_logits(13, kernel_size, init)
    torch.testing.assert_close(GeometricPrior(13, kernel_size, init=init)(), want)
    torch.testing.assert_close(DirectGeometricPrior(13, kernel_size, init=init)(), want)


def test_centre_prior_peaks_at_the_centre_with_per_group_sharpness():
    logits = peaked_prior_logits(8, 7, "centre")
    for group in logits:
        assert group.flatten().argmax().item() == 24  # the centre of 7 x 7
        assert group[3, 3] == 0
    # one pixel right of the centre: -s_g, spread log-uniformly over PRIOR_SHARPNESS
    step = -logits[:, 3, 4]
    torch.testing.assert_close(step[0], torch.tensor(PRIOR_SHARPNESS[0]))
    torch.testing.assert_close(step[-1], torch.tensor(PRIOR_SHARPNESS[1]))
    assert (step.diff() > 0).all()
    ratio = window_entropy_ratio(logits)
    # from a local blur to nearly the centre alone: never close to a uniform window
    assert ratio.max() < 0.8 and ratio.min() < 0.1


def test_shift_prior_peaks_each_group_one_pixel_from_the_centre_in_turn():
    groups, size = 20, 7
    logits = peaked_prior_logits(groups, size, "shift")
    peaks = [divmod(group.flatten().argmax().item(), size) for group in logits]
    # groups 0..8 peak at the centre and its 8 neighbours (each once), then the cycle repeats
    assert {(r - 3, c - 3) for r, c in peaks[:9]} == {
        (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    }
    assert [(r - 3, c - 3) for r, c in peaks] == [SHIFT_PEAKS[g % 9] for g in range(groups)]
    for group, (row, col) in zip(logits, peaks, strict=True):
        assert group[row, col] == 0 and (group.flatten() < 0).sum() == size * size - 1
    # the sharpest group is nearly a pure shift: > 90% of its weight on its peak
    sharpest = logits[-1].flatten().softmax(0)
    assert sharpest.max() > 0.9
    # every peak stays inside the smallest window (3 x 3)
    small = peaked_prior_logits(9, 3, "shift")
    assert sorted(g.flatten().argmax().item() for g in small) == list(range(9))
    assert DEFAULT_PRIOR_INIT == "shift"


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
        want = peaked_prior_logits(layer.groups, layer.kernel_size, DEFAULT_PRIOR_INIT)
        torch.testing.assert_close(logits, want)
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
