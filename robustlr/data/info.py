"""Static facts about a dataset: classes, channels, native image size, normalisation."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``image_size`` is the side of the images the loader yields (after any resize), ``channels``
    their channel count; ``mean``/``std`` are per-channel statistics of the [0, 1] pixels, meant
    for the normalisation layer inside the model.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    small_images: bool


_INFO = {
    "digits": DatasetInfo("digits", 10, 32, 3, (0.5,) * 3, (0.5,) * 3, True),
    "cifar10": DatasetInfo(
        "cifar10", 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True
    ),
    "mnist": DatasetInfo("mnist", 10, 28, 3, (0.1307,) * 3, (0.3081,) * 3, True),
    "imagenet": DatasetInfo("imagenet", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD, False),
    "imagefolder": DatasetInfo("imagefolder", 0, 224, 3, IMAGENET_MEAN, IMAGENET_STD, False),
}

DATASETS: tuple[str, ...] = tuple(_INFO)


def base_info(name: str) -> DatasetInfo:
    """The defaults of dataset ``name`` (before its image size or class count are known)."""
    from robustlr.data.errors import DataError

    try:
        return _INFO[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}"
        ) from None
