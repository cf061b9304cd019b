"""The training loop shared by regular and adversarial training (DESIGN.md §4).

``train(config)`` builds data, model and optimiser from a :class:`TrainConfig`, runs the epochs
(DDP under ``torchrun``), writes ``config.json``, ``metrics.csv``, ``checkpoint.pt`` and
``best.pt`` into the run directory (rank 0 only), and reports progress as events. Data order,
augmentation and per-step randomness derive from (seed, epoch, step), so ``resume=True``
continues a killed run exactly (bitwise on the CPU with ``deterministic``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from robustlr.checkpoint import (
    Checkpoint,
    CheckpointError,
    DataRecord,
    TrainingState,
    copy_checkpoint,
    read_checkpoint,
    remove_stale_temp_files,
    write_checkpoint,
)
from robustlr.data import ImageTensorDataset, collate_batch, epoch_seed, load
from robustlr.data.identity import test_identity
from robustlr.distributed import (
    DistContext,
    all_reduce,
    barrier,
    broadcast_object,
    close_distributed,
    init_distributed,
)
from robustlr.runs import BEST, CHECKPOINT, METRICS, new_run_dir, write_latest, write_run_config
from robustlr.train.adversarial import training_hook
from robustlr.train.config import ConfigError, TrainConfig, effective_lr
from robustlr.train.events import (
    CheckpointSaved,
    EpochEnded,
    EpochStarted,
    EventSink,
    RunFinished,
    RunStarted,
    StepEnded,
    TrainEvent,
)
from robustlr.train.hooks import BatchHook, StepContext
from robustlr.train.metrics import BASE_COLUMNS, MetricsCSV
from robustlr.train.param_groups import parameter_groups
from robustlr.train.rng import (
    capture_rng_states,
    restore_rng_states,
    seed_everything,
    set_deterministic,
    step_seed,
)
from robustlr.train.schedule import make_scheduler

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message says what to do."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def is_new_best(accuracy: float, best: float | None) -> bool:
    """Whether an epoch's held-out accuracy makes its checkpoint ``best.pt``: a tie goes to the
    later epoch, which has trained longer (on a few hundred held-out images ties are common,
    and the first of them is often a model still at a high learning rate)."""
    return best is None or accuracy >= best


@dataclass(frozen=True)
class TrainResult:
    """Where the run wrote its files and how it ended."""

    run_dir: Path
    epochs: int
    best_val_acc: float | None
    last_row: dict[str, float]


def train(
    config: TrainConfig,
    on_event: EventSink | None = None,
    hook: BatchHook | None = None,
    resume: bool = False,
) -> TrainResult:
    """Run (or with ``resume``, continue from ``config.out``/checkpoint.pt) one training run.

    The run trains the way its config says: an adversarial ``mode`` gets the adversarial hook
    built from ``config.adversarial`` (:func:`robustlr.train.adversarial.training_hook`).
    ``hook`` plugs a custom :class:`BatchHook` into a regular run.

    Raises :class:`ConfigError` or ``robustlr.data.DataError`` on bad input,
    :class:`CheckpointError` for an unusable checkpoint, :class:`NonFiniteLossError` when the
    loss diverges.
    """
    if hook is not None and config.mode != "regular":
        raise ConfigError(f"a {config.mode} run trains with the hook its config defines")
    hook = hook if hook is not None else training_hook(config)
    ctx = init_distributed(config.device)
    try:
        result = _Run(config, ctx, on_event, hook, resume).run()
    except BaseException:
        close_distributed(ctx)
        raise
    close_distributed(ctx, completed=True)
    return result


class _SkipSampler(Sampler[int]):
    """The first ``skip`` indices of ``base`` left out (resuming in the middle of an epoch)."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.base)
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return len(self.base) - self.skip  # type: ignore[arg-type]


class _Run:
    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext,
        on_event: EventSink | None,
        hook: BatchHook,
        resume: bool,
    ) -> None:
        self.cfg, self.ctx, self.hook, self.resume = cfg, ctx, hook, resume
        self._sink = on_event
        assert cfg.epochs is not None and cfg.batch_size is not None
        self.epochs: int = cfg.epochs
        if cfg.batch_size % ctx.world_size:
            raise ConfigError(
                f"batch size {cfg.batch_size} is not divisible by {ctx.world_size} processes"
            )
        self.batch = cfg.batch_size // ctx.world_size
        self.device = ctx.device
        cuda = self.device.type == "cuda"
        self.amp_dtype = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
        )
        if cfg.amp != "none" and not cuda:
            log.warning("AMP (%s) is for CUDA only; training in fp32 on %s", cfg.amp, self.device)
        # channels_last unless turned off: faster on CUDA and on the CPU alike (the CPU's
        # oneDNN convolutions; lrnet26/resnet26 steps 10%/20% faster, docs/benchmarks.md)
        self.channels_last = cfg.channels_last is not False

    def emit(self, event: TrainEvent) -> None:
        if self._sink is not None and self.ctx.is_main:
            self._sink(event)

    # ---- setup -------------------------------------------------------------------------------
    def _run_dir(self) -> Path:
        cfg = self.cfg
        if self.resume:
            if cfg.out is None:
                raise ConfigError(
                    "--resume needs the run directory (--out) or a runs/latest pointer"
                )
            run_dir = Path(cfg.out)
            if not (run_dir / CHECKPOINT).is_file():
                raise CheckpointError(f"nothing to resume: {run_dir / CHECKPOINT} does not exist")
            return run_dir
        name = str(cfg.out or new_run_dir(cfg.runs_root, cfg.arch, cfg.mode))
        return Path(broadcast_object(name, self.ctx))

    def _data(self) -> tuple[Dataset, Dataset | None]:
        cfg = self.cfg
        kwargs: dict[str, Any] = dict(
            root=cfg.data,
            image_size=cfg.image_size,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            seed=cfg.seed,
            skip_corrupt=cfg.skip_corrupt,
        )
        if cfg.download and not self.ctx.is_main:
            barrier(self.ctx)  # rank 0 downloads first
        train_set = load(cfg.dataset, "train", augment=cfg.augment, download=cfg.download, **kwargs)
        if cfg.download and self.ctx.is_main:
            barrier(self.ctx)
        val_set = load(cfg.dataset, "val", **kwargs) if cfg.val_fraction > 0 else None
        self.test_identity = test_identity(cfg.dataset, **kwargs)
        return train_set, val_set

    def _model(self, num_classes: int, info: Any) -> tuple[nn.Module, dict[str, Any]]:
        from robustlr.models import create_model, model_options

        cfg = self.cfg
        accepted = model_options(cfg.arch)
        options: dict[str, Any] = {}
        for key, value in (
            ("small_input", cfg.small_input),
            ("width", cfg.width),
            ("mean", tuple(info.mean)),
            ("std", tuple(info.std)),
        ):
            if key in accepted and value is not None:
                options[key] = value
        options.update(cfg.model_options)
        try:
            model = create_model(cfg.arch, num_classes=num_classes, **options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
        return model, options

    # ---- main ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        from robustlr.models import list_models

        if cfg.arch not in list_models():
            known = ", ".join(list_models())
            raise ConfigError(f"unknown arch {cfg.arch!r}; expected one of: {known}")
        set_deterministic(cfg.deterministic)
        seed_everything(cfg.seed)
        run_dir = self._run_dir()
        saved = read_checkpoint(run_dir / CHECKPOINT, arch=cfg.arch) if self.resume else None
        state = saved.training if saved is not None else None
        if saved is not None and state is None:
            raise CheckpointError(f"{run_dir / CHECKPOINT} holds no training state to resume")

        train_set, val_set = self._data()
        info = train_set.info  # type: ignore[attr-defined]
        model, options = self._model(info.num_classes, info)
        if cfg.sync_bn and ctx.distributed and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

        sampler = DistributedSampler(
            train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
        )
        steps = len(sampler) // self.batch
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        if steps == 0:
            raise ConfigError(
                f"batch size {cfg.batch_size} is larger than the training set "
                f"({len(train_set)} images)"  # type: ignore[arg-type]
            )
        optimizer = torch.optim.SGD(
            parameter_groups(model, effective_lr(cfg), cfg.relation_lr_scale),
            lr=effective_lr(cfg),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
        scheduler = make_scheduler(
            optimizer,
            steps,
            self.epochs,
            cfg.warmup_epochs,
            cfg.schedule,
            cfg.milestones,
            cfg.gamma,
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        start_epoch, start_step, global_step = 0, 0, 0
        best: float | None = None
        progress: dict[str, Any] = {}
        if saved is not None and state is not None:
            try:
                model.load_state_dict(saved.model)
                optimizer.load_state_dict(state.optimizer)
                scheduler.load_state_dict(state.scheduler)
                scaler.load_state_dict(state.scaler)
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise CheckpointError(
                    f"checkpoint {run_dir / CHECKPOINT} does not match this run: {first}"
                ) from None
            restore_rng_states(state.rng)
            start_epoch, start_step = saved.epoch, state.step_in_epoch
            global_step = saved.step
            best = state.best_val_acc
            progress = dict(state.epoch_progress)
            saved_world = state.world_size
            if start_step and saved_world != ctx.world_size:
                raise CheckpointError(
                    f"{run_dir / CHECKPOINT} was saved mid-epoch by {saved_world} process(es); "
                    f"resume it with the same number, not {ctx.world_size}"
                )

        raw_model = model
        if ctx.distributed:
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.raw_model, self.model = raw_model, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.run_dir, self.options, self.info = run_dir, options, info
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        columns = [*BASE_COLUMNS, *self.hook.metric_names]

        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(run_dir)
            write_run_config(
                run_dir,
                {
                    **cfg.to_dict(),
                    "out": str(run_dir),
                    "model_options_resolved": {
                        k: list(v) if isinstance(v, tuple) else v for k, v in options.items()
                    },
                    "world_size": ctx.world_size,
                    "lr_effective": effective_lr(cfg),
                },
            )
            write_latest(run_dir)
            self.metrics = MetricsCSV(run_dir / METRICS, columns, keep_epochs=start_epoch)
        self.emit(
            RunStarted(
                run_dir,
                cfg.to_dict(),
                start_epoch,
                start_step,
                self.epochs,
                steps,
                ctx.world_size,
                str(self.device),
                sum(p.numel() for p in raw_model.parameters()),
                len(train_set),
                len(val_set) if val_set is not None else 0,  # type: ignore[arg-type]
            )
        )

        row: dict[str, float] = {}
        for epoch in range(start_epoch, self.epochs):
            skip = start_step if epoch == start_epoch else 0
            row, global_step = self._epoch(
                epoch,
                steps,
                skip,
                global_step,
                sampler,
                train_set,
                val_set,
                progress if skip else {},
                best,
            )
            acc = row["val_acc"] if val_set is not None else row["train_acc"]
            is_best = is_new_best(acc, best)
            best = acc if is_best else best
            if ctx.is_main:
                self.metrics.append(row)
                self._save(epoch + 1, 0, global_step, best, {}, is_best)
            self.emit(EpochEnded(epoch + 1, self.epochs, row))
        barrier(ctx)
        self.emit(RunFinished(run_dir, self.epochs, best))
        return TrainResult(run_dir, self.epochs, best, row)

    # ---- one epoch -----------------------------------------------------------------------------
    def _epoch(
        self,
        epoch: int,
        steps: int,
        skip: int,
        global_step: int,
        sampler: DistributedSampler,
        train_set: Dataset,
        val_set: Dataset | None,
        progress: dict[str, Any],
        best: float | None,
    ) -> tuple[dict[str, float], int]:
        cfg, ctx = self.cfg, self.ctx
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_size=self.batch,
            sampler=_SkipSampler(sampler, skip * self.batch),
            drop_last=True,
            num_workers=cfg.num_workers,
            collate_fn=collate_batch if isinstance(train_set, ImageTensorDataset) else None,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, salt=3 + ctx.rank)),
        )
        self.emit(EpochStarted(epoch + 1, self.epochs, steps, skip))
        names = self.hook.metric_names
        # running sums: loss*n, correct, n, then (sum, count) per extra metric
        sums = torch.zeros(3 + 2 * len(names), dtype=torch.float64)
        if progress and ctx.is_main:  # saved sums are global: restore them on one rank only
            sums = progress["sums"].clone()
        seconds0 = float(progress.get("seconds", 0.0))
        self.model.train()
        it = iter(loader)
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        for i in range(skip, steps):
            seed = step_seed(cfg.seed, epoch, i, ctx.rank)
            torch.manual_seed(seed)  # dropout and image-folder transforms of this step
            x, y = next(it)
            lr = self.scheduler.get_last_lr()[0]  # the lr this step trains with
            batch_sums = self._step(x, y, epoch, i, global_step, seed, names)
            sums += batch_sums
            global_step += 1
            self.emit(
                StepEnded(
                    epoch + 1,
                    i + 1,
                    steps,
                    float(batch_sums[0] / batch_sums[2]),
                    lr,
                    int(batch_sums[2]) * ctx.world_size,
                )
            )
            every = cfg.checkpoint_every_steps
            if every and global_step % every == 0 and i + 1 < steps:
                elapsed = seconds0 + time.perf_counter() - t0
                global_sums = all_reduce(sums.clone(), ctx)
                if ctx.is_main:
                    progress = {"sums": global_sums, "seconds": elapsed}
                    self._save(epoch, i + 1, global_step, best, progress, False)
        train_seconds = seconds0 + time.perf_counter() - t0
        all_reduce(sums, ctx)
        t1 = time.perf_counter()
        val_acc = self._evaluate(val_set) if val_set is not None else math.nan
        seconds = train_seconds + time.perf_counter() - t1
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "lr": lr,  # of the epoch's last step
            "loss": float(sums[0] / sums[2]),
            "train_acc": float(sums[1] / sums[2]),
            "val_acc": val_acc,
            "images_per_s": float(sums[2]) / max(train_seconds, 1e-9),
            "seconds": seconds,
            "images": int(sums[2]),
        }
        for k, name in enumerate(names):
            row[name] = float(sums[3 + 2 * k] / max(float(sums[4 + 2 * k]), 1.0))
        return row, global_step

    def _step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        i: int,
        global_step: int,
        seed: int,
        names: tuple[str, ...],
    ) -> torch.Tensor:
        cfg, ctx = self.cfg, self.ctx
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        sctx = StepContext(
            epoch, i, global_step, self.device, self.amp_dtype, gen, self.info.num_classes
        )
        batch = self.hook.transform(self.raw_model, x, y, sctx)
        x, y = batch.x, batch.y
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            logits = self.model(x)
            loss = self.hook.loss(logits, batch, self.criterion, sctx)
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        if all_reduce(bad, ctx, op="max").item():
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1} "
                f"(lr {self.scheduler.get_last_lr()[0]:.3g}); training stopped. The last good "
                f"checkpoint is kept: {self.run_dir / CHECKPOINT}. Lower the learning rate "
                "or enable gradient clipping (--set grad_clip=...)."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        with torch.no_grad():
            n = y.shape[0]
            out = [
                loss.detach().double() * n,
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=y.device),
            ]
            extra = self.hook.metrics(logits.detach(), batch, sctx)
            for name in names:
                s, c = extra.get(name, (torch.zeros((), device=y.device), 0))
                out += [
                    s.detach().double(),
                    torch.tensor(float(c), dtype=torch.float64, device=y.device),
                ]
        return torch.stack(out).cpu()

    @torch.no_grad()
    def _evaluate(self, dataset: Dataset) -> float:
        """Top-1 accuracy on ``dataset``, each rank taking every world_size-th image."""
        ctx, cfg = self.ctx, self.cfg
        indices = list(range(ctx.rank, len(dataset), ctx.world_size))  # type: ignore[arg-type]
        loader = DataLoader(
            dataset,
            batch_size=cfg.eval_batch_size or max(self.batch, 256),
            sampler=indices,
            num_workers=cfg.num_workers,
            collate_fn=collate_batch if isinstance(dataset, ImageTensorDataset) else None,
            pin_memory=self.device.type == "cuda",
        )
        model = self.raw_model
        model.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                logits = model(x)
            counts[0] += float((logits.argmax(1) == y).sum())
            counts[1] += y.shape[0]
        model.train()
        all_reduce(counts, ctx)
        return float(counts[0] / counts[1]) if counts[1] else math.nan

    def _save(
        self,
        epoch: int,
        step_in_epoch: int,
        global_step: int,
        best: float | None,
        progress: dict[str, Any],
        is_best: bool,
    ) -> None:
        cfg = self.cfg
        checkpoint = Checkpoint(
            arch=cfg.arch,
            model_options=dict(self.options),
            num_classes=self.info.num_classes,
            model=self.raw_model.state_dict(),
            epoch=epoch,
            step=global_step,
            config=cfg.to_dict(),
            data=DataRecord(
                name=self.info.name,
                image_size=self.info.image_size,
                channels=self.info.channels,
                num_classes=self.info.num_classes,
                root=cfg.data,
                val_fraction=cfg.val_fraction,
                split_seed=cfg.split_seed,
                source_shape=self.test_identity.source_shape if self.test_identity else (),
                fingerprint=self.test_identity.fingerprint if self.test_identity else "",
            ),
            training=TrainingState(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                rng=capture_rng_states(),
                step_in_epoch=step_in_epoch,
                epoch_progress=progress,
                best_val_acc=best,
                world_size=self.ctx.world_size,
            ),
        )
        path = write_checkpoint(checkpoint, self.run_dir / CHECKPOINT)
        self.emit(CheckpointSaved(path, epoch, global_step, False))
        if is_best:
            best_path = copy_checkpoint(path, self.run_dir / BEST)
            self.emit(CheckpointSaved(best_path, epoch, global_step, True))
