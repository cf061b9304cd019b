"""Model sizes (params, FLOPs) next to what the paper reports (Tables 2, 7 and 8)."""

from __future__ import annotations

import torch

from robustlr.models.flops import count_flops, count_params
from robustlr.models.registry import create_model

# arch -> (params in millions, GFLOPs) at 224x224 and 1000 classes; reference values only.
PAPER_SIZES: dict[str, tuple[float, float]] = {
    "resnet18": (11.7, 3.1),
    "lrnet18": (14.4, 2.5),
    "resnet26": (16.0, 2.6),
    "lrnet26": (14.7, 2.6),
    "resnet50": (25.5, 4.3),
    "lrnet50": (23.3, 4.3),
    "resnet101": (44.4, 8.0),
    "lrnet101": (42.0, 8.0),
}


def model_size(
    arch: str, input_size: int = 224, num_classes: int = 1000, **options: object
) -> dict[str, object]:
    """Params and multiply-adds of ``arch`` at ``input_size``, with the paper's values.

    The model is built on the meta device (no memory, no init cost). Keys: arch, params,
    flops, params_m, gflops, paper_params_m, paper_gflops (None where the paper has none,
    and always None unless input_size is 224, num_classes 1000 and no options are given).
    """
    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes, **options)
    params = count_params(model)
    flops = count_flops(model, input_size)
    paper_params, paper_gflops = None, None
    if input_size == 224 and num_classes == 1000 and not options and arch in PAPER_SIZES:
        paper_params, paper_gflops = PAPER_SIZES[arch]
    return {
        "arch": arch,
        "params": params,
        "flops": flops,
        "params_m": params / 1e6,
        "gflops": flops / 1e9,
        "paper_params_m": paper_params,
        "paper_gflops": paper_gflops,
    }
