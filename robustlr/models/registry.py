"""The model registry: a model is a function decorated with ``@register_model`` (timm style).

A registered function takes keyword options only (``num_classes`` among them) and returns an
``nn.Module``; its signature is the list of options ``create_model`` accepts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

ModelFn = Callable[..., nn.Module]

_MODELS: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn`` under its ``__name__``; its keyword parameters are the model's options."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    for param in inspect.signature(fn).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"model function {name} must take keyword-only options, not {param}")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def model_options(name: str) -> dict[str, object]:
    """The options of model ``name`` and their defaults."""
    fn = _lookup(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()}


def create_model(name: str, num_classes: int = 1000, **options: object) -> nn.Module:
    """Build the registered model ``name``; unknown names or options raise ValueError."""
    fn = _lookup(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return fn(num_classes=num_classes, **options)


def _lookup(name: str) -> ModelFn:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]
