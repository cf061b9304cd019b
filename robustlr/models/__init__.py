"""Models: the paper's ResNet and LR-Net families behind a registry, and their sizes."""

from robustlr.models import lrnet, resnet  # noqa: F401  (registers the models)
from robustlr.models.flops import count_flops, count_params
from robustlr.models.registry import create_model, list_models, model_options, register_model
from robustlr.models.sizes import PAPER_SIZES, model_size

__all__ = [
    "PAPER_SIZES",
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "model_options",
    "model_size",
    "register_model",
]
