"""Evaluate a checkpoint the way ``robustlr eval`` does: find it, load its test images, attack,
and append one row per attack to the run's ``eval.csv`` (earlier rows are never rewritten).
Every evaluation reports the clean accuracy: a clean row is added when the attacks lack one."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from robustlr.attacks.spec import AttackSpec
from robustlr.checkpoint import Checkpoint, read_checkpoint
from robustlr.data import DATASETS, DataError
from robustlr.data import load as load_dataset
from robustlr.data.identity import identity_differences, test_identity
from robustlr.data.registry import base_info
from robustlr.distributed import DistContext
from robustlr.eval.runner import (
    RESULT_COLUMNS,
    evaluate,
    merge_shards,
    outcome_filename,
    save_outcomes,
    subset_sha256,
)
from robustlr.models.fold import fold_batchnorm
from robustlr.runs import TARGETS, locked_append

log = logging.getLogger(__name__)


@dataclass
class EvalTarget:
    """A checkpoint ready for evaluation, with the metadata every result row carries."""

    checkpoint: Path
    run_dir: Path
    model: nn.Module
    meta: dict[str, Any]
    saved: Checkpoint
    image_size: int

    @property
    def config(self) -> dict[str, Any]:
        """The training config the checkpoint records ({} if none)."""
        return self.saved.config

    @property
    def data_root(self) -> str | None:
        """The data path the run was trained with (None: embedded or not recorded)."""
        return self.saved.data.root if self.saved.data is not None else self.config.get("data")

    def load_images(
        self,
        split: str = "test",
        root: str | Path | None = None,
        limit: int | None = None,
        *,
        allow_other_data: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """This checkpoint's ``split`` images as its training served them (see
        :func:`load_eval_images`); ``root`` overrides the recorded data path.

        The data found there is checked against the identity the checkpoint records
        (:meth:`check_data`) before any image is attacked."""
        name = self.meta["dataset"]
        if root is not None and name in DATASETS and base_info(name).embedded:
            raise DataError(
                f"{name} is built in and takes no data path: --data {root} would not be used "
                "(evaluate a run trained on that data instead)"
            )
        root = root if root is not None else self.data_root
        self.check_data(root, allow_other_data)
        return load_eval_images(name, split, root, self.image_size, limit)

    def check_data(self, root: str | Path | None, allow_other_data: bool = False) -> None:
        """Compare the test split at ``root`` with the data identity the checkpoint records.

        Data that differs raises DataError naming what differs, unless ``allow_other_data``:
        then the rows record the data actually used (``dataset`` becomes the data path's name
        and ``data_sha256`` its fingerprint). A checkpoint of an older robustlr records no
        fingerprint: what it records is compared, with a warning."""
        record = self.saved.data
        name = self.meta["dataset"]
        if record is None:
            log.warning("%s records no data set: the data cannot be checked", self.checkpoint)
            return
        actual = test_identity(
            record.name,
            root=root,
            image_size=self.image_size or None,
            val_fraction=record.val_fraction,
            split_seed=record.split_seed,
        )
        if actual is None:
            return
        if not record.fingerprint:
            log.warning(
                "%s records no data fingerprint (older robustlr): only its class count is "
                "checked; retrain or evaluate with care",
                self.checkpoint,
            )
        differ = identity_differences(
            record.num_classes, record.source_shape, record.fingerprint, actual
        )
        self.meta["data_sha256"] = actual.fingerprint
        if not differ:
            return
        where = f"the data at {root}" if root is not None else f"the {name} data found"
        if not allow_other_data:
            raise DataError(
                f"{where} is not the {name} data checkpoint {self.checkpoint} was trained on "
                f"({'; '.join(differ)}); pass --allow-other-data to evaluate on it anyway"
            )
        log.warning("evaluating on other data than trained on: %s", "; ".join(differ))
        self.meta["dataset"] = Path(root).name if root is not None else f"{name}?"


class ModelTarget(Protocol):
    """What evaluation needs of a target (a checkpoint's :class:`EvalTarget` or an external
    model's ``robustlr.eval.external.ExternalTarget``): the model and its rows' metadata."""

    model: nn.Module
    meta: dict[str, Any]


def with_clean(specs: Sequence[AttackSpec]) -> list[AttackSpec]:
    """``specs`` with a clean row first when they have none (every evaluation reports it)."""
    specs = list(specs)
    if not any(s.name == "clean" for s in specs):
        specs.insert(0, AttackSpec("clean"))
    return specs


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_seed(config: dict[str, Any]) -> str:
    """The training seed a checkpoint's config records, as text ("" when it records none)."""
    seed = config.get("seed")
    return "" if seed is None or isinstance(seed, bool) else str(int(seed))


def open_checkpoint(path: Path, device: torch.device) -> EvalTarget:
    """Load a checkpoint safely (``weights_only``) and build its model in eval mode."""
    saved = read_checkpoint(path, map_location="cpu")
    model = saved.build_model().to(device).eval()
    config = saved.config
    meta = {
        "run": path.parent.name,
        "arch": saved.arch,
        "train_mode": saved.mode,
        "train_seed": train_seed(config),
        "dataset": saved.data.name if saved.data else config.get("dataset", ""),
        "checkpoint_sha256": saved.sha256,  # of the very bytes the model was built from
    }
    return EvalTarget(
        checkpoint=path,
        run_dir=path.parent,
        model=model,
        meta=meta,
        saved=saved,
        image_size=int(saved.data.image_size if saved.data else config.get("image_size") or 0),
    )


def load_eval_images(
    dataset: str,
    split: str,
    root: str | Path | None,
    image_size: int | None,
    limit: int | None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The first ``limit`` images of a split (all when None), without augmentation.

    Shape: -> images (N, C, S, S) on [0, 1], labels (N,), dataset indices.
    """
    ds = load_dataset(dataset, split, root, image_size=image_size or None, augment=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    indices = list(range(n))
    if hasattr(ds, "__getitems__"):
        images, labels = ds.__getitems__(indices)
    else:
        items = [ds[i] for i in indices]
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([int(y) for _, y in items])
    return images, labels.long(), indices


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows to a results CSV, writing the header only for a new file. An existing file
    keeps its own column order (columns it lacks are dropped from the new rows, with a log).
    The file is locked while the header is read and the rows appended, so processes appending
    to one eval.csv side by side lose, duplicate and interleave nothing."""

    def text(size: int) -> str:
        fieldnames = list(RESULT_COLUMNS)
        if size:
            with path.open(newline="") as fh:
                fieldnames = next(csv.reader(fh), fieldnames)
            dropped = set(rows[0]) - set(fieldnames) if rows else set()
            if dropped:
                log.warning("%s has no column(s) %s; they are not written", path, sorted(dropped))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fieldnames, extrasaction="ignore")
        if not size:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    locked_append(path, text)


def evaluate_checkpoint(
    target: ModelTarget,
    specs: Sequence[AttackSpec],
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: Sequence[int],
    split: str,
    out_csv: Path,
    batch_size: int,
    device: torch.device,
    examples_dir: Path | None = None,
    on_batch: Callable[[AttackSpec, int], None] | None = None,
    dist_ctx: DistContext | None = None,
) -> list[dict[str, Any]]:
    """Attack ``images`` with every spec (and clean, :func:`with_clean`), append the rows to
    ``out_csv`` and return them, in the order of ``with_clean(specs)``.

    Under ``torchrun`` (``dist_ctx`` of several processes) each rank attacks every
    world-size-th image; rank 0 gathers the per-example outcomes, writes the rows and returns
    them (other ranks return []). Results equal a single-process run's: targets and random
    starts are keyed by image index.
    """
    specs = with_clean(specs)
    subset = subset_sha256(labels, indices)
    ids = torch.as_tensor(list(indices), dtype=torch.int64)
    rank, world = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx else (0, 1)
    targets_dir = out_csv.parent / TARGETS
    # a checkpoint's model (the toolkit's own architectures) runs with its BatchNorm folded: the
    # same function without BatchNorm passes; an external model runs as given
    model = fold_batchnorm(target.model) if isinstance(target, EvalTarget) else target.model
    results = evaluate(
        model,
        images[rank::world],
        labels[rank::world],
        specs,
        example_ids=ids[rank::world],
        batch_size=batch_size,
        device=device,
        targets_dir=targets_dir if world == 1 else None,
        on_batch=on_batch,
    )
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        if rank != 0:
            return []
        results = [
            merge_shards([shard[i] for shard in gathered], targets_dir) for i in range(len(specs))
        ]
    rows = []
    for result in results:
        row = result.row({**target.meta, "split": split, "subset_sha256": subset})
        if examples_dir is not None:
            # named by the row's threat key: a file is shared only by identical threat models
            path = save_outcomes(examples_dir / outcome_filename(row), result, row)
            row["outcomes_file"] = _relative(path, out_csv.parent)
        rows.append(row)
    append_rows(out_csv, rows)
    return rows


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())
