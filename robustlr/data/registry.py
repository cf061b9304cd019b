"""The dataset registry: every dataset's facts and defaults, declared once.

A :class:`DatasetSpec` owns a dataset's class count, channels, the image size it is served at
by default (by :func:`robustlr.data.load` and for training alike), its normalisation and its
training defaults. Everything else (the loader, ``TrainConfig``'s defaults, the checkpoint's
record of its test data) reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset as served.

    ``image_size`` is the side of the images the loader yields (after any resize), ``channels``
    their channel count; ``mean``/``std`` are per-channel statistics of the [0, 1] pixels, meant
    for the normalisation layer inside the model. ``embedded``: the data ships with a library
    and its loader takes no data path.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    small_images: bool
    embedded: bool = False


@dataclass(frozen=True)
class TrainingDefaults:
    """The training settings a run of this dataset gets when the user leaves them unset.

    ``adversarial`` overrides some of them for adversarial training (which costs (steps + 2)
    passes per image instead of one). ``weight_decay`` None keeps ``TrainConfig``'s.
    """

    width: float
    epochs: int
    batch_size: int
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    weight_decay: float | None = None
    adversarial: dict[str, Any] = field(default_factory=dict)

    def settings(self, mode: str = "regular") -> dict[str, Any]:
        """These defaults as ``TrainConfig`` field values (for ``mode``)."""
        out: dict[str, Any] = {
            "width": self.width,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "warmup_epochs": self.warmup_epochs,
            "schedule": self.schedule,
            "milestones": list(self.milestones),
        }
        if self.weight_decay is not None:
            out["weight_decay"] = self.weight_decay
        if mode == "adversarial":
            out.update(self.adversarial)
        return out


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset: its facts (:attr:`info`) and its training defaults."""

    info: DatasetInfo
    training: TrainingDefaults

    @property
    def name(self) -> str:
        return self.info.name

    def train_defaults(self, mode: str = "regular") -> dict[str, Any]:
        """``TrainConfig`` values for fields the user left unset (image size included)."""
        return {
            "image_size": self.info.image_size,
            "small_input": self.info.small_images,
            **self.training.settings(mode),
        }


_CIFAR_TRAINING = TrainingDefaults(width=1.0, epochs=100, batch_size=128)

_REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # digits: 1,294 training images of 8x8 scans served upsampled to 16x16. At 8x8 a 7x7
        # window covers most of the image and, from the 4x4 stage on, all of it, so LR-Net loses
        # the locality the paper shows it needs (Table 3: 7x7 71.9 vs full image 50.7) and
        # learns badly; 16x16 keeps the first stages local (docs/lrnet-training.md). Sized so
        # that ``robustlr train`` takes a few minutes on 2 CPU cores. Weight decay 5e-4 (the
        # usual value for small data sets, CIFAR's included): on these 1,294 images it gives
        # LR-Net 98.1% on three seeds of three against 96.4/98.3/96.9 at 1e-4, and ResNet-26
        # 98.9/97.5/97.8 against 99.4/98.6/98.9 (docs/lrnet-training.md). Adversarial training:
        # 10 epochs (PGD-16: 18 passes a step) take lrnet26 past 80% clean accuracy.
        DatasetSpec(
            DatasetInfo("digits", 10, 16, 3, (0.5,) * 3, (0.5,) * 3, True, embedded=True),
            TrainingDefaults(
                width=0.25,
                epochs=12,
                batch_size=64,
                warmup_epochs=1.0,
                weight_decay=5e-4,
                adversarial={"epochs": 10},
            ),
        ),
        DatasetSpec(
            DatasetInfo(
                "cifar10", 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True
            ),
            _CIFAR_TRAINING,
        ),
        DatasetSpec(
            DatasetInfo(
                "cifar100", 100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True
            ),
            _CIFAR_TRAINING,
        ),
        DatasetSpec(
            DatasetInfo("mnist", 10, 28, 3, (0.1307,) * 3, (0.3081,) * 3, True),
            TrainingDefaults(width=1.0, epochs=20, batch_size=128),
        ),
        # the paper's ImageNet protocol: 110 epochs, lr 0.4 at 1024, warm-up 5, /10 at 30/60/90
        DatasetSpec(
            DatasetInfo("imagenet", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD, False),
            TrainingDefaults(
                width=1.0,
                epochs=110,
                batch_size=256,
                warmup_epochs=5.0,
                schedule="step",
                milestones=(30, 60, 90),
            ),
        ),
        # any ImageFolder tree; its class count is read from the directory (0 until then)
        DatasetSpec(
            DatasetInfo("imagefolder", 0, 224, 3, IMAGENET_MEAN, IMAGENET_STD, False),
            TrainingDefaults(width=1.0, epochs=90, batch_size=256),
        ),
    )
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``; :class:`~robustlr.data.errors.DataError` if unknown."""
    from robustlr.data.errors import DataError

    try:
        return _REGISTRY[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}"
        ) from None


def base_info(name: str) -> DatasetInfo:
    """The facts of dataset ``name`` (before its image size or class count are known)."""
    return dataset_spec(name).info
