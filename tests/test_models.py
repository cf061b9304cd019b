"""Models: registry, forward/backward of every arch, sizes vs golden, knobs, CLI, bench (sizes vs
the paper and torchvision: test_model_sizes.py).

Regenerate the golden sizes after an intended change with:
    python tests/test_models.py --update-golden
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustlr.models import (
    count_flops,
    count_params,
    create_model,
    list_models,
    model_options,
    model_size,
)
from robustlr.models.flops import local_relation_flops
from robustlr.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from robustlr.nn import LocalRelation2d
from robustlr.nn.local_relation2d import GeometricPrior

GOLDEN = Path(__file__).parent / "golden" / "model_sizes.json"
ARCHS = tuple(list_models())  # every registered model
SMALL_WIDTH = 0.125  # keeps the forward/backward of every arch fast on the CPU


def golden_sizes() -> dict[str, dict[str, int]]:
    """Params and FLOPs at 224x224 / 1000 classes, and at 32x32 small-input / 10 classes."""
    sizes = {}
    for arch in list_models():
        at224 = model_size(arch, input_size=224, num_classes=1000)
        at32 = model_size(arch, input_size=32, num_classes=10, small_input=True)
        sizes[arch] = {
            "params_224": at224["params"],
            "flops_224": at224["flops"],
            "params_32_small": at32["params"],
            "flops_32_small": at32["flops"],
        }
    return sizes


def lr_layers(model: torch.nn.Module) -> list[LocalRelation2d]:
    return [m for m in model.modules() if isinstance(m, LocalRelation2d)]


def meta_model(arch: str, **options) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(arch, **options)


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_the_paper_archs():
    paper = {f"{family}{depth}" for family in ("resnet", "lrnet") for depth in (18, 26, 50, 101)}
    assert paper <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_arch_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown model 'lrnet27'.*lrnet26.*resnet50"):
        create_model("lrnet27")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option.*kernel_size.*valid options:.*width"):
        create_model("resnet26", kernel_size=7)
    with pytest.raises(ValueError, match=r"unknown option.*bogus"):
        create_model("lrnet26", bogus=1)


def test_bad_option_values_are_value_errors():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="geometric_prior"):
        meta_model("lrnet26", geometric_prior="gaussian")
    with pytest.raises(ValueError, match="width"):
        meta_model("lrnet26", width=0)
    with pytest.raises(ValueError, match="mean and std"):
        meta_model("resnet18", mean=None)


def test_every_model_has_the_common_options():
    common = {"num_classes", "mean", "std", "small_input", "width", "zero_init_residual"}
    lr = {"kernel_size", "m", "geometric_prior", "composability", "qk_dim", "lr_backend"}
    for arch in ARCHS:
        options = set(model_options(arch))
        assert common <= options
        assert (lr <= options) == arch.startswith("lrnet")


# --- forward and backward -------------------------------------------------------------------


# every model with the small-input stem; the ImageNet stem of the others is the same code, so
# the default tier checks it on two of them and the slow tier on all
STEMS = [pytest.param(arch, True, 16, id=f"{arch}-small16") for arch in ARCHS] + [
    pytest.param(
        arch,
        False,
        32,
        id=f"{arch}-stem32",
        marks=() if arch in ("resnet26", "lrnet26") else pytest.mark.slow,
    )
    for arch in ARCHS
]


@pytest.mark.parametrize(("arch", "small_input", "size"), STEMS)
def test_forward_backward(arch, small_input, size):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, small_input=small_input, width=SMALL_WIDTH)
    x = torch.rand(2, 3, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    feature_side = size if small_input else size // 4
    assert model.forward_features(x).shape[-1] == feature_side // 8


@pytest.mark.parametrize("arch", ["resnet26", "lrnet26"])
def test_channels_last_gives_the_same_outputs(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, small_input=True, width=0.25).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        cl_model = model.to(memory_format=torch.channels_last)
        got = cl_model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- normalisation --------------------------------------------------------------------------


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    model = create_model("lrnet18", num_classes=5, small_input=True, width=0.125).eval()
    assert isinstance(model.normalize, Normalize)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert model.normalize.std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    raw = create_model(
        "lrnet18", num_classes=5, small_input=True, width=0.125, mean=None, std=None
    ).eval()
    assert isinstance(raw.normalize, torch.nn.Identity)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    raw.load_state_dict(state)
    x = torch.rand(2, 3, 16, 16)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw((x - mean) / std))


def test_custom_mean_std():
    model = create_model("resnet18", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), width=0.125)
    assert model.normalize.std.flatten().tolist() == [0.25] * 3


def test_zero_init_residual_zeroes_the_last_bn_of_every_block():
    model = create_model("resnet26", zero_init_residual=True, width=0.125)
    blocks = [b for stage in model.stages for b in stage]
    assert len(blocks) == 8
    assert all(not b.last_bn().weight.any() for b in blocks)
    assert create_model("resnet26", width=0.125).stages[0][0].last_bn().weight.all()


# --- sizes: golden, paper, knobs ------------------------------------------------------------


@pytest.mark.slow  # builds every model at 224x224 and counts its FLOPs: seconds
def test_sizes_match_golden():
    want = json.loads(GOLDEN.read_text())
    got = golden_sizes()
    assert got == want, "sizes changed; if intended: python tests/test_models.py --update-golden"


@pytest.mark.parametrize(
    "depth", [26, *(pytest.param(d, marks=pytest.mark.slow) for d in (50, 101))]
)
def test_lrnet_flops_match_resnet_flops(depth):
    lr = count_flops(meta_model(f"lrnet{depth}"), 224)
    res = count_flops(meta_model(f"resnet{depth}"), 224)
    assert lr / res == pytest.approx(1.0, abs=0.05)


def test_resnet50_counts_are_the_standard_ones():
    model = meta_model("resnet50")
    assert count_params(model) == 25_557_032  # torchvision's resnet50
    assert count_flops(model, 224) == pytest.approx(4.09e9, rel=0.002)


@pytest.mark.slow
def test_table2_widths_and_strides():
    model = meta_model("lrnet50")
    layers = lr_layers(model)
    assert len(layers) == 1 + 3 + 4 + 6 + 3
    assert [(m.channels, m.stride) for m in layers[:2]] == [(64, 2), (100, 1)]
    stride2 = [m.channels for m in layers if m.stride == 2]
    assert stride2 == [64, 200, 400, 800]
    assert {m.groups for m in layers if m.channels == 100} == {13}
    assert all(m.kernel_size == 7 and m.m == 8 for m in layers)


def test_flop_counter_counts_the_local_relation_layer():
    layer = LocalRelation2d(16, kernel_size=5, stride=2, m=4)
    got = count_flops(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1, bias=False), layer), 12)
    ho = 6
    want = (
        12 * 12 * 3 * 16  # the 1x1 before
        + ho * ho * 16 * 4  # query at output positions
        + 12 * 12 * 16 * 4  # key at input positions
        + ho * ho * 16 * 16  # output projection
        + ho * ho * 25 * (4 + 16)  # logits per group and aggregation per channel
    )
    assert got == want
    assert local_relation_flops(layer, torch.zeros(1, 16, ho, ho)) == ho * ho * 25 * 20


def test_flop_count_does_not_touch_the_model():
    model = create_model("lrnet18", width=0.125, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.training
    count_flops(model, 64)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.slow
def test_geometric_prior_none_removes_exactly_the_prior_parameters():
    mlp = meta_model("lrnet26")
    none = meta_model("lrnet26", geometric_prior="none")
    prior_params = sum(count_params(m) for m in mlp.modules() if isinstance(m, GeometricPrior))
    assert prior_params > 0
    assert count_params(mlp) - count_params(none) == prior_params
    assert count_flops(mlp, 224) == count_flops(none, 224)  # the prior is input independent


def test_direct_prior_has_one_value_per_group_and_offset():
    direct = meta_model("lrnet26", geometric_prior="direct", kernel_size=5)
    none = meta_model("lrnet26", geometric_prior="none", kernel_size=5)
    want = sum(m.groups * 25 for m in lr_layers(direct))
    assert count_params(direct) - count_params(none) == want


@pytest.mark.slow
def test_kernel_size_changes_only_the_window_work():
    flops = {k: count_flops(meta_model("lrnet26", kernel_size=k), 224) for k in (3, 5, 7)}
    params = {k: count_params(meta_model("lrnet26", kernel_size=k)) for k in (3, 5, 7)}
    assert len(set(params.values())) == 1  # the MLP prior does not depend on K
    # FLOPs are affine in K*K: (F7 - F5) / (F5 - F3) = (49 - 25) / (25 - 9)
    assert (flops[7] - flops[5]) * 16 == (flops[5] - flops[3]) * 24
    assert flops[3] < flops[5] < flops[7]


@pytest.mark.slow
def test_channel_sharing_sets_the_group_count():
    m8 = meta_model("lrnet26")
    m4 = meta_model("lrnet26", m=4)
    for layer8, layer4 in zip(lr_layers(m8), lr_layers(m4), strict=True):
        assert layer8.groups == math.ceil(layer8.channels / 8)
        assert layer4.groups == math.ceil(layer4.channels / 4)
    # query + key (2 C per group) and the prior's last layer (32 weights + 1 bias per group)
    want = sum(
        (2 * l4.channels + 33) * (l4.groups - l8.groups)
        for l8, l4 in zip(lr_layers(m8), lr_layers(m4), strict=True)
    )
    assert count_params(m4) - count_params(m8) == want


@pytest.mark.slow
def test_qk_dim_multiplies_query_and_key_channels():
    model = meta_model("lrnet26", qk_dim=2)
    assert all(m.query.out_channels == 2 * m.groups for m in lr_layers(model))


@pytest.mark.slow
def test_width_multiplier_scales_every_width_to_ints():
    model = meta_model("lrnet26", width=0.5)
    layers = lr_layers(model)
    assert sorted({m.channels for m in layers}) == [32, 50, 100, 200, 400]
    assert model.fc.in_features == 1024
    assert count_params(meta_model("resnet50", width=0.5)) < count_params(meta_model("resnet50"))


@pytest.mark.slow
def test_small_input_stem_has_no_downsampling():
    small = meta_model("lrnet26", small_input=True)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in small.stem.modules())
    assert lr_layers(small)[0].stride == 1
    assert count_flops(small, 32) > count_flops(meta_model("lrnet26"), 32)


# --- CLI and bench --------------------------------------------------------------------------


@pytest.mark.slow  # every model's size at 224x224 in a subprocess: seconds each
def test_models_command_csv():
    from robustlr.cli.models import models

    result = CliRunner().invoke(models, ["--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert {"arch", "params_m", "gflops", "paper_params_m", "paper_gflops"} <= set(rows[0])
    by_arch = {r["arch"]: r for r in rows}
    assert set(by_arch) == set(list_models())
    golden = json.loads(GOLDEN.read_text())
    for arch, row in by_arch.items():
        assert float(row["params_m"]) == pytest.approx(golden[arch]["params_224"] / 1e6, abs=5e-4)
        assert float(row["gflops"]) == pytest.approx(golden[arch]["flops_224"] / 1e9, abs=5e-4)
    assert by_arch["lrnet50"]["paper_params_m"] == "23.3"


@pytest.mark.slow  # every model's size at 224x224 in a subprocess: seconds each
def test_models_command_other_sizes_have_no_paper_values_and_bad_input_exits_2():
    from robustlr.cli.models import models

    result = CliRunner().invoke(models, ["--format", "json", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert all(r["paper_params_m"] is None for r in rows)
    args = ["--format", "json", "--input-size", "32", "--num-classes", "10", "--small-input"]
    small = {r["arch"]: r for r in json.loads(CliRunner().invoke(models, args).output)}
    golden = json.loads(GOLDEN.read_text())
    assert small["lrnet26"]["gflops"] == golden["lrnet26"]["flops_32_small"] / 1e9
    bad = CliRunner().invoke(models, ["--format", "xml"])
    assert bad.exit_code == 2
    assert CliRunner().invoke(models, ["--input-size", "0"]).exit_code == 2


def test_bench_models_on_cpu():
    from robustlr.bench.model import bench_models

    rows = bench_models(["lrnet18", "resnet18"], 16, 2, "cpu", repeats=1, warmup=0, width=0.125)
    assert [r["arch"] for r in rows] == ["lrnet18", "resnet18"]
    for row in rows:
        assert row["reference"] == "resnet18"
        assert row["small_input"] is True
        assert row["step_ms"] > 0 and row["images_per_s"] > 0
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0
    assert rows[1]["ratio"] == 1.0
    with pytest.raises(ValueError, match="at least one arch"):
        bench_models([], 16, 2, "cpu")


def test_bench_model_command_runs():
    from robustlr.cli.bench_model import model

    runner = CliRunner()
    result = runner.invoke(
        model,
        [
            "--archs",
            "resnet18",
            "--input-size",
            "16",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--width",
            "0.125",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "resnet18" in result.output
    bad = runner.invoke(model, ["--archs", "resnet18,nonet"])
    assert bad.exit_code == 2
    assert "nonet" in bad.output


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        sys.exit("usage: python tests/test_models.py --update-golden")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden_sizes(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


def test_bench_model_threads_and_cpu_time_restore_the_thread_count():
    import torch

    from robustlr.cli.bench_model import model

    before = torch.get_num_threads()
    args = ["--archs", "resnet18", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
            "--warmup", "0", "--width", "0.125", "--device", "cpu"]  # fmt: skip
    args += ["--threads", "1", "--cpu-time"]
    result = CliRunner().invoke(model, args)
    assert result.exit_code == 0, result.output
    assert "1 threads, process_cpu clock" in " ".join(result.output.split())
    assert torch.get_num_threads() == before
