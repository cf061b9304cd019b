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


class ConfigError(ValueError):
    """A bad recipe file or override (unknown key, wrong type); the CLI shows it as one line."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (model, data, optimisation, run control).

    ``lr`` None means 0.1 x global batch / 256 (the paper's 0.4 at batch 1024). ``batch_size``
    is the global batch, split evenly across processes. ``epochs``/``image_size``/``width``
    None mean the dataset's defaults (:func:`dataset_defaults`).
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


_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # digits: 1,294 training images of 8x8 scans upsampled to 16x16. At 8x8 a 7x7 window covers
    # most of the image and the deeper stages (4x4 and less) all of it, so LR-Net loses the
    # locality the paper shows it needs (Table 3: 7x7 71.9 vs full image 50.7) and learns badly
    # (docs/lrnet-training.md); 16x16 keeps the windows local in the first stages. Sized so that
    # ``robustlr train`` takes a few minutes on 2 CPU cores.
    "digits": dict(
        image_size=16, width=0.25, epochs=12, batch_size=64, small_input=True, warmup_epochs=1.0
    ),
    "cifar10": dict(image_size=32, width=1.0, epochs=100, batch_size=128, small_input=True),
    "cifar100": dict(image_size=32, width=1.0, epochs=100, batch_size=128, small_input=True),
    "mnist": dict(image_size=28, width=1.0, epochs=20, batch_size=128, small_input=True),
    # the paper's ImageNet protocol: 110 epochs, lr 0.4 at 1024, warm-up 5, /10 at 30/60/90
    "imagenet": dict(
        image_size=224,
        width=1.0,
        epochs=110,
        batch_size=256,
        small_input=False,
        warmup_epochs=5.0,
        schedule="step",
        milestones=[30, 60, 90],
    ),
    "imagefolder": dict(image_size=224, width=1.0, epochs=90, batch_size=256, small_input=False),
}


# Adversarial training costs (steps + 2) passes per image instead of one: on the embedded digits
# data fewer epochs keep ``robustlr advtrain --arch lrnet26 --steps 16`` within 10 minutes on 2
# CPU cores. Architecture settings stay those of regular training, so the two runs of a network
# are the same model (as Table 9 compares them).
_ADVERSARIAL_DEFAULTS: dict[str, dict[str, Any]] = {"digits": dict(epochs=4)}


def dataset_defaults(dataset: str, mode: str = "regular") -> dict[str, Any]:
    """The per-dataset (and per-mode) defaults that fill fields left unset (None) by the user."""
    defaults = dict(_DATASET_DEFAULTS.get(dataset, {}))
    if mode == "adversarial":
        defaults.update(_ADVERSARIAL_DEFAULTS.get(dataset, {}))
    return defaults


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


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (1e-3, true, [30, 60], "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.1", "model.kernel_size=5", "adversarial.steps=4"]`` ->
    ``{"lr": 0.1, "model_options": {...}, "adversarial": {...}}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        value = parse_value(text.strip())
        if key.startswith("model."):
            out.setdefault("model_options", {})[key[len("model.") :]] = value
        elif key.startswith("adversarial."):
            out.setdefault("adversarial", {})[key[len("adversarial.") :]] = value
        else:
            out[key] = value
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
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for values no run can use."""
    from robustlr.data import DATASETS

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
        (
            cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
            f"device must be auto, cpu or cuda, not {cfg.device!r}",
        ),
        ((cfg.epochs or 1) >= 1, "epochs must be at least 1"),
        ((cfg.batch_size or 1) >= 1, "batch size must be at least 1"),
        (cfg.lr is None or cfg.lr > 0, "lr must be positive"),
        (cfg.relation_lr_scale >= 0, "relation_lr_scale must be >= 0"),
        (0.0 <= cfg.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
        (0.0 <= cfg.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
        (cfg.grad_clip is None or cfg.grad_clip > 0, "grad_clip must be positive"),
        ((cfg.width or 1.0) > 0, "width must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def effective_lr(cfg: TrainConfig) -> float:
    """The peak learning rate: ``cfg.lr`` or the linear scaling rule 0.1 x batch / 256."""
    assert cfg.batch_size is not None
    return cfg.lr if cfg.lr is not None else 0.1 * cfg.batch_size / 256
