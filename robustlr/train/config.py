"""The training configuration: defaults, then a recipe TOML, then ``key=value`` overrides.

There is no global configuration: a :class:`TrainConfig` is built once per run, saved as
``config.json`` in the run directory and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlr.errors import UserError
from robustlr.settings import apply_assignments

MODES = ("regular", "adversarial")


class ConfigError(UserError):
    """A bad recipe file or override (unknown key, wrong type); the CLI shows it as one line."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (model, data, optimisation, run control).

    ``lr`` None means 0.1 x global batch / 256 (the paper's 0.4 at batch 1024). ``batch_size``
    is the global batch, split evenly across processes. ``epochs``/``image_size``/``width``
    None mean the dataset's defaults (:func:`dataset_defaults`). ``mode`` is "regular" or
    "adversarial"; an adversarial run's threat model is ``adversarial`` (resolved to every
    field of :class:`robustlr.train.adversarial.AdversarialTraining`), and a regular run has
    none. A resumed run keeps both: they decide how it trains. ``channels_last`` None means
    on (model and batches in channels_last memory format, on any device).
    """

    arch: str = "resnet26"
    mode: str = "regular"
    dataset: str = "digits"
    data: str | None = None
    download: bool = False
    image_size: int | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: bool = True
    skip_corrupt: bool = False
    num_workers: int = 0
    # model
    width: float | None = None
    small_input: bool | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    # adversarial training threat model (mode "adversarial"; see robustlr.train.adversarial)
    adversarial: dict[str, Any] = field(default_factory=dict)
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    # learning-rate multiplier of the LR layers' query/key projections (docs/lrnet-training.md)
    relation_lr_scale: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: str = "none"
    channels_last: bool | None = None
    sync_bn: bool = False
    # run control
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    out: str | None = None
    runs_root: str = "runs"
    checkpoint_every_steps: int = 0
    max_steps_per_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and ``torch.load(weights_only=True)``-safe copy (plain containers only)."""
        return dataclasses.asdict(self)


def dataset_defaults(dataset: str, mode: str = "regular") -> dict[str, Any]:
    """The per-dataset (and per-mode) defaults that fill fields left unset (None) by the user:
    read from the dataset registry (:mod:`robustlr.data.registry`); {} for an unknown name
    (:func:`validate` reports it)."""
    from robustlr.data.registry import DATASETS, dataset_spec

    return dataset_spec(dataset).train_defaults(mode) if dataset in DATASETS else {}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _allowed_types(name: str) -> tuple[type, ...]:
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def coerce(name: str, value: Any) -> Any:
    """Check/convert ``value`` for field ``name`` (ints accepted for floats; str for paths)."""
    if name not in _FIELDS:
        raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(_FIELDS))}")
    allowed = _allowed_types(name)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"setting {name!r} cannot be empty")
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    elif isinstance(value, (list, tuple)) and list in allowed:
        return list(value)
    elif isinstance(value, Mapping) and dict in allowed:
        return dict(value)
    names = "/".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"setting {name!r} expects {names}, got {value!r}")


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.1", "model.kernel_size=5", "adversarial.steps=4"]`` ->
    ``{"lr": 0.1, "model_options": {...}, "adversarial": {...}}`` (the one ``--set`` grammar,
    :mod:`robustlr.settings`; ``model.`` keys are the model's options)."""
    out = apply_assignments({}, pairs)
    if "model" in out:
        model = out.pop("model")
        if not isinstance(model, dict):
            raise ConfigError("--set model=... needs a key: model.<option>=VALUE")
        out["model_options"] = {**model, **out.get("model_options", {})}
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Training settings from a recipe TOML: its ``[train]`` table, or its top level.

    A ``[train.model]`` (or top-level ``[model]``) table becomes ``model_options``.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    table = data.get("train", data)
    if not isinstance(table, dict):
        raise ConfigError(f"recipe {path}: [train] must be a table")
    table = dict(table)
    if "model" in table and isinstance(table["model"], dict):
        table["model_options"] = {**table.pop("model"), **table.get("model_options", {})}
    return table


def resolve(*layers: Mapping[str, Any]) -> TrainConfig:
    """Build a config from layers applied in order (later wins); ``model_options`` and
    ``adversarial`` merge key by key.

    The chosen dataset's :func:`dataset_defaults` sit below all layers (above the dataclass
    defaults).
    """
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            value = coerce(key, value)
            if key in ("model_options", "adversarial"):
                values[key] = {**values.get(key, {}), **value}
            else:
                values[key] = value
    dataset = values.get("dataset", TrainConfig.dataset)
    mode = values.get("mode", TrainConfig.mode)
    defaults = {k: coerce(k, v) for k, v in dataset_defaults(dataset, mode).items()}
    cfg = TrainConfig(**{**defaults, **values})
    validate(cfg)
    _resolve_adversarial(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for values no run can use."""
    from robustlr.data import DATASETS
    from robustlr.device import check_device_name

    checks = [
        (
            cfg.dataset in DATASETS,
            f"unknown dataset {cfg.dataset!r}; expected one of: " + ", ".join(DATASETS),
        ),
        (cfg.image_size is None or cfg.image_size >= 1, "image size must be at least 1"),
        (cfg.num_workers >= 0, "workers must be >= 0"),
        (
            cfg.schedule in ("cosine", "step"),
            f"schedule must be cosine or step, not {cfg.schedule!r}",
        ),
        (cfg.amp in ("none", "bf16", "fp16"), f"amp must be none, bf16 or fp16, not {cfg.amp!r}"),
        (cfg.mode in MODES, f"mode must be one of {', '.join(MODES)}, not {cfg.mode!r}"),
        (cfg.epochs is None or cfg.epochs >= 1, f"epochs must be at least 1, not {cfg.epochs}"),
        (cfg.batch_size is None or cfg.batch_size >= 1, "batch size must be at least 1"),
        (cfg.lr is None or cfg.lr > 0, "lr must be positive"),
        (cfg.relation_lr_scale >= 0, "relation_lr_scale must be >= 0"),
        (0.0 <= cfg.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
        (0.0 <= cfg.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
        (cfg.grad_clip is None or cfg.grad_clip > 0, "grad_clip must be positive"),
        (cfg.width is None or cfg.width > 0, "width must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_device_name(cfg.device)
    if cfg.mode == "regular" and cfg.adversarial:
        raise ConfigError(
            "adversarial settings given for a regular run: use mode adversarial (advtrain)"
        )


def _resolve_adversarial(cfg: TrainConfig) -> None:
    """Fill an adversarial run's threat model with its defaults, validated (ConfigError)."""
    if cfg.mode != "adversarial":
        return
    from robustlr.train.adversarial import AdversarialTraining

    try:
        settings = AdversarialTraining(**cfg.adversarial)
    except TypeError as exc:
        raise ConfigError(f"adversarial training: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"adversarial training: {exc}") from None
    cfg.adversarial = settings.as_dict()


def effective_lr(cfg: TrainConfig) -> float:
    """The peak learning rate: ``cfg.lr`` or the linear scaling rule 0.1 x batch / 256."""
    assert cfg.batch_size is not None
    return cfg.lr if cfg.lr is not None else 0.1 * cfg.batch_size / 256
