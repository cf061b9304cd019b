"""A data set's identity: what a checkpoint records about the data it was trained for, and
what evaluation compares before it attacks (one home for the fields and the comparison).

The identity is the data set's name, its class count, the shape its images are stored in
(channels, height, width, before any serving resize) and a fingerprint of its test split
(SHA-256 of the stored images and labels; for an image folder, of its files and labels).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataIdentity:
    """The identity of a loaded test split (see the module docstring)."""

    name: str
    num_classes: int
    source_shape: tuple[int, ...]  # (C, H, W) as stored; () when not known
    fingerprint: str  # "" when it cannot be computed


def split_fingerprint(ds: Dataset) -> str:
    """SHA-256 of a split's stored images and labels (an in-memory dataset), or of its files'
    paths (relative to the folder) and labels (an image folder); "" for other datasets."""
    digest = hashlib.sha256()
    images = getattr(ds, "images", None)
    labels = getattr(ds, "labels", None)
    if torch.is_tensor(images) and torch.is_tensor(labels):
        digest.update(f"{images.dtype} {tuple(images.shape)}".encode())
        digest.update(images.contiguous().numpy().tobytes())
        digest.update(labels.long().numpy().astype("<i8").tobytes())
        return digest.hexdigest()
    samples = getattr(ds, "samples", None)
    root = getattr(ds, "root", None)
    if samples is not None and root is not None:
        for path, label in samples:
            digest.update(f"{os.path.relpath(path, root)}\t{int(label)}\n".encode())
        return digest.hexdigest()
    return ""


def split_identity(ds: Dataset) -> DataIdentity:
    """The identity of a test split as :func:`robustlr.data.load` served it."""
    info = ds.info  # type: ignore[attr-defined]
    images = getattr(ds, "images", None)
    shape = tuple(int(v) for v in getattr(ds, "source_shape", ()))
    if not shape and torch.is_tensor(images):
        shape = tuple(int(v) for v in images.shape[1:])
    return DataIdentity(info.name, int(info.num_classes), shape, split_fingerprint(ds))


def identity_record(identity: DataIdentity) -> dict[str, Any]:
    """The identity as the fields a checkpoint's data record stores."""
    return {"source_shape": list(identity.source_shape), "fingerprint": identity.fingerprint}


def identity_differences(
    recorded_classes: int,
    recorded_shape: tuple[int, ...],
    recorded_fingerprint: str,
    actual: DataIdentity,
) -> list[str]:
    """What differs between the recorded identity and ``actual``, one phrase each ("image size
    16x16 recorded, 28x28 here"); fields not recorded (an older checkpoint) are not compared."""
    out = []
    if recorded_classes and actual.num_classes and recorded_classes != actual.num_classes:
        out.append(f"classes {recorded_classes} recorded, {actual.num_classes} here")
    if len(recorded_shape) == 3 and len(actual.source_shape) == 3:
        if recorded_shape[0] != actual.source_shape[0]:
            out.append(f"channels {recorded_shape[0]} recorded, {actual.source_shape[0]} here")
        if tuple(recorded_shape[1:]) != tuple(actual.source_shape[1:]):
            have = "x".join(map(str, recorded_shape[1:]))
            here = "x".join(map(str, actual.source_shape[1:]))
            out.append(f"image size {have} recorded, {here} here")
    if recorded_fingerprint and actual.fingerprint and recorded_fingerprint != actual.fingerprint:
        out.append(
            f"test split fingerprint {recorded_fingerprint[:12]} recorded, "
            f"{actual.fingerprint[:12]} here"
        )
    return out


def check_labels(labels: np.ndarray | torch.Tensor, num_classes: int, where: str) -> None:
    """DataError unless ``labels`` are integers, one per image (1-D), in [0, num_classes)
    (the range is not checked when ``num_classes`` is 0: not known yet)."""
    from robustlr.data.errors import DataError

    array = labels.numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if array.ndim != 1:
        raise DataError(
            f"{where}: labels must be one class index per image (1-D), got shape {array.shape}"
        )
    if array.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got {array.dtype}")
    if len(array) and num_classes:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= num_classes:
            raise DataError(
                f"{where}: labels must lie in [0, {num_classes - 1}], found {low}..{high}"
            )


def test_identity(name: str, **load_options: Any) -> DataIdentity | None:
    """The identity of dataset ``name``'s test split as :func:`robustlr.data.load` serves it
    with ``load_options`` (root, image_size, ...); None, with a warning, when that data set has
    no test split to load (its checkpoints then record no fingerprint)."""
    from robustlr.data.errors import DataError
    from robustlr.data.load import load

    # the files as listed, corrupt ones included: training and evaluation fingerprint alike
    skipped = ("seed", "augment", "skip_corrupt", "download")
    options = {k: v for k, v in load_options.items() if k not in skipped}
    try:
        return split_identity(load(name, "test", augment=False, **options))
    except DataError as exc:
        log.warning(
            "no test split of %s to fingerprint (%s); the checkpoint records none", name, exc
        )
        return None
