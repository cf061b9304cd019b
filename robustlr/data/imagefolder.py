"""ImageFolder datasets (ImageNet layout) with the paper's crops and corrupt-file handling."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import datasets, transforms

from robustlr.data.errors import DataError

log = logging.getLogger(__name__)


def train_transform(image_size: int = 224) -> transforms.Compose:
    """RandomResizedCrop + horizontal flip, then [0, 1] tensor (no normalisation: the model does
    it)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )


def eval_transform(image_size: int = 224) -> transforms.Compose:
    """Resize to 256/224 of the crop side, centre crop, then [0, 1] tensor."""
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )


def _open_rgb(path: str) -> Image.Image:
    """Decode one image file as RGB, or raise :class:`DataError` naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"corrupt or unreadable image file {path}: {exc}") from None


def _is_readable(path: str) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False
    return True


class CheckedImageFolder(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose images are decoded as RGB with clear errors.

    With ``skip_corrupt=True`` every file is decoded once up front and the unreadable ones are
    dropped; their number is in ``skipped`` (and logged). Otherwise a corrupt file raises
    :class:`DataError` naming it when it is read.

    Shape: item -> ((3, S, S) float32 in [0, 1], int label).
    """

    def __init__(
        self, root: str | Path, transform: transforms.Compose, skip_corrupt: bool = False
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a directory")
        try:
            super().__init__(str(root), transform=transform, loader=_open_rgb)
        except FileNotFoundError as exc:
            raise DataError(f"no images found under {root}: {exc}") from None
        self.skipped = 0
        if skip_corrupt:
            keep = [(p, c) for p, c in self.samples if _is_readable(p)]
            self.skipped = len(self.samples) - len(keep)
            if self.skipped:
                log.warning("skipped %d corrupt image file(s) under %s", self.skipped, root)
            self.samples = self.imgs = keep
            self.targets = [c for _, c in keep]


def labels_of(dataset: CheckedImageFolder) -> torch.Tensor:
    """All labels of an image folder, without decoding images. Shape: (N,) int64."""
    return torch.as_tensor(dataset.targets, dtype=torch.int64)
