"""Datasets: digits, .npz files (made here and the shared ones), ImageFolder with corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import image_folder, shared_data_dir

from robustlr.data import DataError, collate_batch, dataset_info, load, train_val_indices


def test_digits_splits_are_disjoint_seeded_and_in_range() -> None:
    train = load("digits", "train", image_size=16, augment=False)
    val = load("digits", "val", image_size=16)
    test = load("digits", "test", image_size=16)
    assert len(train) + len(val) + len(test) == 1797
    assert len(test) == 359 and len(val) == round(0.1 * 1438)
    x, y = train.__getitems__(list(range(len(train))))
    assert x.shape == (len(train), 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert torch.equal(x[:, 0], x[:, 2])  # grey value replicated to 3 channels
    # val never overlaps train, test is a different split: no image appears twice
    xv, _ = val.__getitems__(list(range(len(val))))
    xt, _ = test.__getitems__(list(range(len(test))))
    flat = torch.cat([x, xv, xt]).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] >= len(flat) - 20  # digits holds a few duplicates
    assert torch.equal(load("digits", "val", image_size=16).images, val.images)  # seeded
    assert train.info.num_classes == 10 and train.info.image_size == 16


def test_split_indices_are_a_partition() -> None:
    tr, va = train_val_indices(103, 0.2, seed=5)
    assert len(va) == 21 and len(tr) == 82
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(103))
    _, va2 = train_val_indices(103, 0.2, seed=6)
    assert not torch.equal(va, va2)


def test_augmentation_depends_on_sample_and_epoch_only() -> None:
    ds = load("digits", "train", image_size=16, seed=3)
    ds.set_epoch(2)
    full, _ = ds.__getitems__([5, 9, 11, 40])
    single, _ = ds.__getitems__([11])
    assert torch.equal(full[2], single[0])  # same crop whatever the batch
    ds.set_epoch(3)
    other, _ = ds.__getitems__([5, 9, 11, 40])
    assert not torch.equal(full, other)
    plain = load("digits", "train", image_size=16, augment=False)
    assert plain.augment is None


def _write_npz(path, n_train=30, n_test=10, channels=3, size=12):
    rng = np.random.default_rng(0)
    shape = (size, size, channels) if channels == 3 else (size, size)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train).astype(np.int64),
        x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test).astype(np.int64),
    )
    return np.load(path)


@pytest.mark.parametrize("channels", [3, 1])
def test_npz_written_here(tmp_path, channels) -> None:
    path = tmp_path / f"tiny{channels}.npz"
    z = _write_npz(path, channels=channels)
    test = load("cifar10", "test", path)
    x, y = test.__getitems__(list(range(len(test))))
    ref = torch.from_numpy(z["x_test"]).float() / 255
    ref = ref.permute(0, 3, 1, 2) if channels == 3 else ref.unsqueeze(1).expand(-1, 3, -1, -1)
    assert x.shape == (10, 3, 12, 12)
    assert torch.equal(x, ref) and torch.equal(y, torch.from_numpy(z["y_test"]))
    train, val = load("cifar10", "train", path), load("cifar10", "val", path)
    assert len(train) == 27 and len(val) == 3
    xb, _ = collate_batch(train.__getitems__([0, 1]))
    assert xb.shape == (2, 3, 12, 12) and float(xb.min()) >= 0 and float(xb.max()) <= 1
    resized = load("cifar10", "test", path, image_size=20)
    assert resized[0][0].shape == (3, 20, 20) and resized.info.image_size == 20


def test_npz_without_arrays_is_a_data_error(tmp_path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="lacks"):
        load("cifar10", "test", path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load("cifar10", "test", junk)


def test_bad_names_and_paths() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load("svhn")
    with pytest.raises(DataError, match="does not exist"):
        load("cifar10", "train", "/nonexistent/cifar10.npz")
    with pytest.raises(DataError, match="unknown split"):
        load("digits", "validation")
    with pytest.raises(DataError, match="needs a data path"):
        load("imagefolder", "train")


@pytest.mark.parametrize(
    ("name", "shape", "train_n"), [("cifar10", (3, 32, 32), 50000), ("mnist", (3, 28, 28), 60000)]
)
def test_shared_npz(name, shape, train_n) -> None:
    path = shared_data_dir() / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present (set ROBUSTLR_DATA_DIR to the shared data directory)")
    test = load(name, "test", path)
    assert len(test) == 10000
    x, y = test.__getitems__(list(range(64)))
    assert x.shape == (64, *shape) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and int(y.max()) <= 9
    assert test.info.num_classes == 10 and test.info.image_size == shape[-1]
    if name == "mnist":  # small enough to check the split sizes quickly
        assert len(load(name, "train", path)) + len(load(name, "val", path)) == train_n


def test_image_folder_crops_and_val_slice(tmp_path) -> None:
    root = image_folder(tmp_path / "imgs", corrupt=False)
    info = dataset_info("imagefolder", root, image_size=32)
    assert info.num_classes == 2 and info.image_size == 32
    train = load("imagefolder", "train", root, image_size=32, val_fraction=0.2)
    val = load("imagefolder", "val", root, image_size=32, val_fraction=0.2)
    test = load("imagefolder", "test", root, image_size=32)
    assert (len(train), len(val), len(test)) == (8, 2, 4)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert isinstance(y, int)
    assert test[0][0].shape == (3, 32, 32)


def test_image_folder_corrupt_file_named_or_skipped(tmp_path) -> None:
    root = image_folder(tmp_path / "imgs", corrupt=True)
    ds = load("imagefolder", "test", root)  # the val/ folder is clean
    assert len(ds) == 4
    train = load("imagefolder", "train", root, val_fraction=0.0)
    bad = [i for i, (p, _) in enumerate(train.dataset.samples) if p.endswith("zz_broken.png")]
    with pytest.raises(DataError, match=r"zz_broken\.png"):
        train[bad[0]]
    skipping = load("imagefolder", "train", root, val_fraction=0.0, skip_corrupt=True)
    assert skipping.skipped == 1 and len(skipping) == 10
    for i in range(len(skipping)):
        assert skipping[i][0].shape == (3, 224, 224)
