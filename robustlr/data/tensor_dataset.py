"""In-memory image datasets with batched indexing and seeded, resumable augmentation.

The images live in one tensor (uint8 or float, NCHW). ``__getitems__`` serves a whole batch in
one indexing operation (``torch.utils.data.DataLoader`` calls it when present; pair it with
:func:`collate_batch`). Augmentation parameters are drawn per *sample index* from a generator
seeded by ``(seed, epoch)`` (see :meth:`ImageTensorDataset.set_epoch`), so an image gets the same
crop and flip whatever the batch size, the number of processes, or whether the run was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


@dataclass(frozen=True)
class CropFlip:
    """Random crop after zero padding by ``padding`` pixels, and a horizontal flip if ``flip``."""

    padding: int = 4
    flip: bool = True


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed derived from (seed, epoch, salt); distinct inputs give unrelated streams."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt * 104_729) % 2**63)
    return int(torch.randint(0, 2**62, (1,), generator=g))


class ImageTensorDataset(Dataset):
    """Images and labels held in memory; yields float [0, 1] NCHW images and int64 labels.

    Args:
        images: (N, C, H, W) uint8 (0..255) or float ([0, 1]) tensor.
        labels: (N,) integer labels.
        image_size: resize served images to this side (bilinear) when it differs from H.
        augment: train-time :class:`CropFlip`, or None.
        seed: base seed of the augmentation draws.

    Shape: item -> ((C, S, S) float32, () int64); batch -> ((B, C, S, S), (B,)).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        image_size: int | None = None,
        augment: CropFlip | None = None,
        seed: int = 0,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected (N, C, H, W) images and (N,) labels, got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.image_size = image_size or images.shape[-1]
        self.augment = augment
        self.seed = seed
        self._params: torch.Tensor | None = None
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.images.shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentation parameters (dy, dx, flip) for every sample index."""
        if self.augment is None:
            return
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, salt=1))
        n, span = len(self), 2 * self.augment.padding + 1
        shifts = torch.randint(0, span, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n, 1), generator=g) * int(self.augment.flip)
        self._params = torch.cat([shifts, flips], dim=1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Serve a batch: ((B, C, S, S) float32 in [0, 1], (B,) int64)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment is not None:
            assert self._params is not None
            x = _crop_flip(x, self._params[idx], self.augment.padding)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            down = x.shape[-1] > self.image_size
            x = F.interpolate(
                x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=down
            ).clamp_(0.0, 1.0)
        return x, self.labels[idx]


def _crop_flip(x: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-sample shifted crop of the zero-padded batch, then optional horizontal flip.

    Shape: x (B, C, H, W), params (B, 3) = (dy, dx, flip) -> (B, C, H, W).
    """
    b, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)
        rows = params[:, 0:1] + torch.arange(h)  # (B, H)
        cols = params[:, 1:2] + torch.arange(w)  # (B, W)
        bi = torch.arange(b)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = params[:, 2].bool()
    if flip.any():
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def collate_batch(batch: object) -> object:
    """DataLoader ``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch
