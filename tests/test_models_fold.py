"""BatchNorm folding (robustlr.models.fold): every registered model computes the same function
folded, in float64, against torch's own BatchNorm as the reference; evaluation uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlr.models import create_model, list_models
from robustlr.models.fold import fold_batchnorm, foldable_pairs

# the 101-layer models take most of this file's time: the slow tier runs them
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a.endswith("101") else a for a in list_models()]


def trained_looking(arch: str, seed: int = 0) -> nn.Module:
    """A small float64 model of ``arch`` in eval mode whose BatchNorms hold non-trivial
    statistics and affine parameters (fresh ones are the identity, which would hide errors)."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10, width=0.125, small_input=True).double()
    gen = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        n = bn.num_features
        # within 20% of the identity: 101 layers of wilder scales make the input gradient
        # chaotic (1e7 and more), which would test conditioning, not folding
        bn.running_mean.copy_((torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 0.4)
        bn.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) * 0.4 + 0.8)
        bn.weight.data.copy_(torch.rand(n, generator=gen, dtype=torch.float64) * 0.4 + 0.8)
        bn.bias.data.copy_((torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 0.4)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_model_computes_the_same_function(arch: str) -> None:
    model = trained_looking(arch)
    folded = fold_batchnorm(model)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = model(xa), folded(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    if arch.endswith("101"):
        # at 101 layers these random statistics make the input gradient ill-conditioned:
        # scaling every parameter by 1 + 1e-13 moves it by 1e-4 relative (measured on lrnet101),
        # as much as folding does, so only the logits are compared there
        return
    # the input gradient (what an attack follows) too
    ga = torch.autograd.grad(ya.logsumexp(1).sum(), xa)[0]
    gb = torch.autograd.grad(yb.logsumexp(1).sum(), xb)[0]
    torch.testing.assert_close(gb, ga, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("arch", ["resnet26", "lrnet26"])
def test_folding_copies(arch: str) -> None:
    """The original is untouched; the copy has one BatchNorm fewer per folded pair."""
    model = trained_looking(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert folded is not model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(left) == len(bns) - len(foldable_pairs(model))


@pytest.mark.parametrize("arch", ["resnet26", "lrnet26"])
def test_every_convolution_batchnorm_pair_folds(arch: str) -> None:
    """Every BatchNorm that follows a Conv2d folds (ResNets: all of them; LR-Nets: all but the
    ones after a local relation layer, which is not a convolution)."""
    model = trained_looking(arch)
    folded = fold_batchnorm(model)
    assert foldable_pairs(model)
    assert not foldable_pairs(folded)
    if arch.startswith("resnet"):
        assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]


def test_a_model_without_pairs_and_a_sequential_subclass_are_left_alone() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(plain) is plain

    class Reordered(nn.Sequential):  # runs its children in its own order
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[0](self[1](x.repeat(1, 4 // x.shape[1], 1, 1)))

    odd = Reordered(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(odd) is odd
