"""Process-group setup for ``torchrun`` (DDP: NCCL on GPU, gloo on CPU) and small collectives,
shared by training and evaluation (so neither imports the other).

A plain ``python`` run is a world of one: every helper here is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from robustlr.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistContext:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1, else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistContext(rank, world, local_rank, dev)


def close_distributed(ctx: DistContext, *, completed: bool = False) -> None:
    """Leave the process group (if this module joined one). ``completed``: this rank finished
    its work normally, so it first waits for the others (a rank that tears gloo down while a
    peer still runs can abort that peer: "terminate called without an active exception"); a
    rank that failed leaves at once (torchrun stops its peers)."""
    if ctx.distributed and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; returns ``t``."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks."""
    if ctx.distributed:
        dist.barrier()
