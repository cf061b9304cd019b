"""``load(name, split, root)``: every dataset as float [0, 1] NCHW images and int64 labels."""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from robustlr.data.errors import DataError
from robustlr.data.identity import check_labels
from robustlr.data.registry import DATASETS, DatasetInfo, base_info
from robustlr.data.splits import train_val_indices
from robustlr.data.tensor_dataset import CropFlip, ImageTensorDataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DIGITS_TEST_FRACTION = 0.2
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST"}
_AUGMENT = {
    "cifar10": CropFlip(4, True),
    "cifar100": CropFlip(4, True),
    "mnist": CropFlip(2, False),
}


def default_root() -> Path:
    """Where torchvision datasets are looked for (and downloaded to): ``$ROBUSTLR_DATA`` or
    ``~/.cache/robustlr/data``."""
    return Path(os.environ.get("ROBUSTLR_DATA", "~/.cache/robustlr/data")).expanduser()


def dataset_info(
    name: str, root: str | Path | None = None, image_size: int | None = None
) -> DatasetInfo:
    """Facts about dataset ``name`` as :func:`load` would serve it (class count, size, channels).

    For ``imagefolder`` the class count is read from ``root/train``'s sub-directories.
    """
    info = base_info(name)
    changes: dict[str, object] = {}
    if image_size is not None:
        changes["image_size"] = int(image_size)
    elif name == "mnist" and root is not None and Path(root).suffix == ".npz":
        changes["image_size"] = 28
    if name == "imagefolder":
        train_dir = _folder_split_dir(_existing(root, name), "train")
        changes["num_classes"] = sum(1 for p in train_dir.iterdir() if p.is_dir())
    return dataclasses.replace(info, **changes)


def load(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    *,
    image_size: int | None = None,
    augment: bool | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    seed: int = 0,
    download: bool = False,
    skip_corrupt: bool = False,
) -> Dataset:
    """Load one split of a dataset as float [0, 1] NCHW images and int64 labels.

    Args:
        name: one of ``DATASETS`` (digits, cifar10, cifar100, mnist, imagenet, imagefolder).
        split: "train", "val" (a seeded held-out slice of the training set, for model
            selection) or "test".
        root: a torchvision root directory, an ``.npz`` file with x_train/y_train/x_test/y_test
            (uint8 NHWC), or the ImageFolder root (``train/`` and ``val/`` or ``test/``).
            Ignored for digits (embedded in scikit-learn).
        image_size: side of the served images (default: the dataset's own).
        augment: train-time augmentation (default: on for "train", off otherwise).
        val_fraction: share of the training set held out as "val".
        split_seed: seed of the train/val split (independent of the training seed).
        seed: seed of the augmentation draws (per sample, per epoch: see ``set_epoch``).
        download: let torchvision download cifar/mnist into ``root``.
        skip_corrupt: ImageFolder only: drop unreadable files (counted) instead of failing.

    Returns a Dataset with an ``info`` attribute (:class:`DatasetInfo`). In-memory datasets
    serve whole batches through ``__getitems__`` (use ``collate_batch``) and have ``set_epoch``.

    Raises :class:`DataError` on an unknown name or split, or a missing or malformed path.
    Shape: item -> ((C, S, S) float32, () int64).
    """
    info = base_info(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if augment is None:
        augment = split == "train"
    if name in ("imagenet", "imagefolder"):
        return _load_folder(
            name, split, root, image_size, augment, val_fraction, split_seed, skip_corrupt
        )
    if name == "digits":
        images, labels = _digits(split in ("train", "val"), image_size or info.image_size)
        crop = CropFlip(max(1, (image_size or info.image_size) // 16), False)
    else:
        images, labels = _arrays(
            name,
            _existing(root, name) if root is not None else None,
            split in ("train", "val"),
            download,
        )
        crop = _AUGMENT[name]
    source_shape = tuple(images.shape[1:])
    if images.shape[1] == 1:  # grey images are served as 3 channels (the value replicated)
        images = images.expand(-1, 3, -1, -1)
    check_labels(labels, info.num_classes, f"{name} {split} split{f' at {root}' if root else ''}")
    if split != "test":
        train_idx, val_idx = train_val_indices(len(labels), val_fraction, split_seed)
        keep = train_idx if split == "train" else val_idx
        images, labels = images[keep], labels[keep]
    size = image_size or (info.image_size if name == "digits" else images.shape[-1])
    ds = ImageTensorDataset(images, labels, size, crop if augment else None, seed)
    ds.info = dataclasses.replace(info, image_size=size)  # type: ignore[attr-defined]
    ds.source_shape = source_shape  # type: ignore[attr-defined]
    return ds


def _existing(root: str | Path | None, name: str) -> Path:
    if root is None:
        raise DataError(f"dataset {name!r} needs a data path (--data)")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    return path


def _digits(train: bool, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, seeded 80/20 train/test split, upsampled to ``size``, 3 channels
    (the grey value replicated, so 3-channel models and attacks apply unchanged)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    rest, test = train_val_indices(len(y), DIGITS_TEST_FRACTION, seed=20190527)
    keep = rest if train else test
    x, y = x[keep], y[keep]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous(), y


@lru_cache(maxsize=4)
def _read_npz(path: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    part = "train" if train else "test"
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {f"x_{part}", f"y_{part}"} - set(z.files)
            if missing:
                raise DataError(
                    f"{path} lacks {sorted(missing)} (expects x_train/y_train/x_test/y_test)"
                )
            x, y = z[f"x_{part}"], z[f"y_{part}"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path} as an .npz archive: {exc}") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
        raise DataError(f"{path}: x_{part} must be uint8 NHWC (or NHW) with one label per image")
    check_labels(y, 0, f"{path}: y_{part}")
    t = torch.from_numpy(x)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous(), torch.from_numpy(y.astype(np.int64))


def _arrays(
    name: str, root: Path | None, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images (1 or 3 channels) and int64 labels from an .npz or torchvision."""
    if root is not None and root.is_file():
        x, y = _read_npz(root, train)
    else:
        x, y = _torchvision(name, root or default_root(), train, download)
    if x.shape[1] not in (1, 3):
        raise DataError(f"{name}: expected 1 or 3 channels, got {x.shape[1]}")
    return x, y


def _torchvision(
    name: str, root: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = getattr(datasets, _TORCHVISION[name])
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise DataError(
            f"{name} not found under {root} ({exc}); pass --data DIR|FILE.npz or --download"
        ) from None
    data = torch.as_tensor(np.asarray(ds.data))
    x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


def _folder_split_dir(root: Path, split: str) -> Path:
    candidates = ["train"] if split == "train" else ["val", "test"]
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DataError(f"{root} has no {' or '.join(c + '/' for c in candidates)} directory")


def _load_folder(
    name: str,
    split: str,
    root: str | Path | None,
    image_size: int | None,
    augment: bool,
    val_fraction: float,
    split_seed: int,
    skip_corrupt: bool,
) -> Dataset:
    from robustlr.data.imagefolder import CheckedImageFolder, eval_transform, train_transform

    path = _existing(root, name)
    size = image_size or 224
    tf = train_transform(size) if augment else eval_transform(size)
    folder = CheckedImageFolder(
        _folder_split_dir(path, "train" if split in ("train", "val") else "test"), tf, skip_corrupt
    )
    info = dataclasses.replace(base_info(name), image_size=size, num_classes=len(folder.classes))
    ds: Dataset = folder
    if split != "test":
        train_idx, val_idx = train_val_indices(len(folder), val_fraction, split_seed)
        ds = Subset(folder, (train_idx if split == "train" else val_idx).tolist())
    ds.info = info  # type: ignore[attr-defined]
    ds.skipped = folder.skipped  # type: ignore[attr-defined]
    return ds


__all__ = ["DATASETS", "SPLITS", "dataset_info", "default_root", "load"]
