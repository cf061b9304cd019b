"""Datasets as float [0, 1] NCHW images and int64 labels (DESIGN.md §3).

``load(name, split, root)`` serves digits (embedded), cifar10/cifar100/mnist (torchvision or an
``.npz``) and imagenet/imagefolder; "val" is a seeded held-out slice of the training set.
"""

from robustlr.data.errors import DataError
from robustlr.data.load import SPLITS, dataset_info, default_root, load
from robustlr.data.registry import (
    DATASETS,
    DatasetInfo,
    DatasetSpec,
    TrainingDefaults,
    dataset_spec,
)
from robustlr.data.splits import train_val_indices
from robustlr.data.tensor_dataset import CropFlip, ImageTensorDataset, collate_batch, epoch_seed

__all__ = [
    "DATASETS",
    "SPLITS",
    "CropFlip",
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "ImageTensorDataset",
    "TrainingDefaults",
    "collate_batch",
    "dataset_info",
    "dataset_spec",
    "default_root",
    "epoch_seed",
    "load",
    "train_val_indices",
]
