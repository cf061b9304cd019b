"""Benchmark of the local relation op against its baselines at LR-Net-26 stage shapes.

Variants, all on the same (B, C, H, W) input and stride:
- ``lr-<backend>``: robustlr's op (the automatic choice by default: cpu on the CPU, cupy on
  CUDA), and ``lr-reference`` beside it when that is another backend;
- ``lr-unfold``: the ``nn.Unfold`` implementation of the same function (the baseline);
- ``conv3x3``: a dense 3x3 convolution C -> C (what ResNet has in that place);
- ``dwconv7x7``: a 7x7 depthwise convolution (same window, no relation: the bandwidth floor).

Times are medians over repeats after warm-up (CUDA events on GPU; on the CPU wall time, or
CPU time with ``cpu_time``, see ``robustlr.bench.model.cpu_clock``). Peak memory is the extra
memory one forward+backward needs beyond its inputs: on CUDA from the caching allocator's peak,
on the CPU from the peak resident set of a fresh process per case (``ru_maxrss``), so that
one case's allocations cannot hide another's.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import torch
import torch.nn.functional as F

from robustlr.bench.model import cpu_clock
from robustlr.bench.unfold_baseline import unfold_local_relation
from robustlr.ops import local_relation, resolve_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpCase:
    """One benchmark shape: the LR layer's input C x H x W and its stride."""

    channels: int
    height: int
    width: int
    stride: int = 1

    @property
    def label(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}/s{self.stride}"

    @classmethod
    def parse(cls, text: str) -> OpCase:
        """Parse ``CxHxW`` or ``CxHxW/sS`` (e.g. ``200x56x56/s2``)."""
        dims, _, stride = text.strip().partition("/s")
        try:
            c, h, w = (int(v) for v in dims.split("x"))
            return cls(c, h, w, int(stride) if stride else 1)
        except ValueError:
            raise ValueError(f"bad op shape {text!r}; expected CxHxW or CxHxW/sS") from None


# LR-Net-26 at 224x224: the LR layer of each stage, and the stride-2 first layer of res3-res5.
LRNET26_CASES = (
    OpCase(100, 56, 56),
    OpCase(200, 56, 56, 2),
    OpCase(200, 28, 28),
    OpCase(400, 28, 28, 2),
    OpCase(400, 14, 14),
    OpCase(800, 14, 14, 2),
    OpCase(800, 7, 7),
)


@dataclass(frozen=True)
class OpSettings:
    batch: int
    device: str
    dtype: str = "float32"
    kernel_size: int = 7
    m: int = 8
    repeats: int = 5
    warmup: int = 1
    backend: str | None = None
    threads: int | None = None  # torch.set_num_threads in the measuring process
    cpu_time: bool = False  # CPU: process CPU time instead of wall time (a shared machine)


@dataclass
class OpTiming:
    case: str
    variant: str
    batch: int
    device: str
    dtype: str
    forward_ms: float
    backward_ms: float
    total_ms: float
    peak_mb: float
    input_mb: float = 0.0


def variants(device: str, backend: str | None = None) -> list[str]:
    """The variant names measured on ``device``: robustlr's backend first, then the reference
    backend (when it is not the first), the unfold formulation and the two convolutions."""
    chosen = resolve_backend(torch.device(device), backend)
    reference = [] if chosen == "reference" else ["lr-reference"]
    return [f"lr-{chosen}", *reference, "lr-unfold", "conv3x3", "dwconv7x7"]


def _make_call(
    case: OpCase, variant: str, settings: OpSettings, batch: int
) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """Inputs (with requires_grad) and a closure computing the variant's forward."""
    dev, dtype = torch.device(settings.device), getattr(torch, settings.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    K, s = settings.kernel_size, case.stride
    C, H, W = case.channels, case.height, case.width
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(device=dev, dtype=dtype).requires_grad_(True)

    x = rand(batch, C, H, W)
    if variant.startswith("lr-"):
        G = math.ceil(C / settings.m)
        q, k, geo = rand(batch, G, Ho, Wo), rand(batch, G, H, W), rand(G, K, K)
        if variant == "lr-unfold":
            return (lambda: unfold_local_relation(x, q, k, geo, K, s)), [x, q, k, geo]
        backend = variant.removeprefix("lr-")
        return (
            lambda: local_relation(x, q, k, geo, kernel_size=K, stride=s, backend=backend),
            [x, q, k, geo],
        )
    if variant == "conv3x3":
        w = rand(C, C, 3, 3, scale=(9 * C) ** -0.5)
        return (lambda: F.conv2d(x, w, stride=s, padding=1)), [x, w]
    if variant == "dwconv7x7":
        w = rand(C, 1, 7, 7, scale=1 / 7)
        return (lambda: F.conv2d(x, w, stride=s, padding=3, groups=C)), [x, w]
    raise ValueError(f"unknown op benchmark variant {variant!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _step_times(
    call: Callable[[], torch.Tensor], device: str, cpu_time: bool = False
) -> tuple[float, float]:
    """One forward and one backward, in milliseconds."""
    if device.startswith("cuda"):
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        y = call()
        mid.record()
        y.backward(torch.ones_like(y))
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(mid), mid.elapsed_time(end)
    clock = cpu_clock() if cpu_time else time.perf_counter
    t0 = clock()
    y = call()
    t1 = clock()
    y.backward(torch.ones_like(y))
    t2 = clock()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(case: OpCase, variant: str, settings: OpSettings) -> OpTiming:
    """Time one variant at one shape, and measure the extra peak memory of a forward+backward
    (with ``settings.threads`` intra-op threads, restored afterwards)."""
    saved_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _measure(case, variant, settings)
    finally:
        torch.set_num_threads(saved_threads)


def _measure(case: OpCase, variant: str, settings: OpSettings) -> OpTiming:
    cuda = settings.device.startswith("cuda")
    # warm libraries up on a tiny case first, so that the peak below is the case's own
    tiny_call, _ = _make_call(OpCase(case.channels, 4, 4, case.stride), variant, settings, 1)
    _step_times(tiny_call, settings.device)
    call, inputs = _make_call(case, variant, settings, settings.batch)
    _sync(settings.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(settings.device)
        base = torch.cuda.memory_allocated(settings.device)
    else:
        base = _peak_rss_mb()
    first = _step_times(call, settings.device, settings.cpu_time)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated(settings.device) - base) / 2**20
    else:
        peak_mb = _peak_rss_mb() - base
    fwd, bwd = [], []
    for i in range(settings.warmup + settings.repeats):
        for t in inputs:
            t.grad = None
        f, b = first if i == 0 else _step_times(call, settings.device, settings.cpu_time)
        if i >= settings.warmup:
            fwd.append(f)
            bwd.append(b)
    return OpTiming(
        case=case.label,
        variant=variant,
        batch=settings.batch,
        device=settings.device,
        dtype=settings.dtype,
        forward_ms=statistics.median(fwd),
        backward_ms=statistics.median(bwd),
        total_ms=statistics.median(f + b for f, b in zip(fwd, bwd, strict=True)),
        peak_mb=max(peak_mb, 0.0),
        input_mb=sum(t.numel() * t.element_size() for t in inputs) / 2**20,
    )


def _measure_in_fresh_process(args: tuple[OpCase, str, OpSettings]) -> OpTiming:
    return measure(*args)


def bench_op(
    cases: Iterable[OpCase],
    settings: OpSettings,
    on_result: Callable[[OpTiming], None] | None = None,
) -> list[OpTiming]:
    """Measure every variant at every case. On the CPU each runs in a fresh process (memory)."""
    jobs = [
        (case, v, settings) for case in cases for v in variants(settings.device, settings.backend)
    ]
    results: list[OpTiming] = []
    if settings.device.startswith("cuda"):
        for job in jobs:
            results.append(measure(*job))
            log.info("%s", results[-1])
            if on_result:
                on_result(results[-1])
        return results
    ctx = get_context("spawn")
    for job in jobs:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            results.append(pool.submit(_measure_in_fresh_process, job).result())
        log.info("%s", results[-1])
        if on_result:
            on_result(results[-1])
    return results


def summarize(results: list[OpTiming]) -> list[dict]:
    """One row per case: each variant's time, and the ratios the design asks for.

    ``speedup_vs_unfold`` = unfold time / robustlr time (forward+backward); ``vs_dwconv7x7`` =
    robustlr time / depthwise 7x7 time; ``memory_saving_vs_unfold`` = unfold peak / robustlr peak;
    ``speedup_vs_reference`` = reference backend time / robustlr time (when both were measured);
    ``memory_vs_input`` = robustlr's peak extra memory / the size of its inputs (x, q, k, geo).
    """
    rows = []
    for case in dict.fromkeys(r.case for r in results):
        by_variant = {r.variant: r for r in results if r.case == case}
        ours = next(r for v, r in by_variant.items() if v.startswith("lr-") and v != "lr-unfold")
        unfold = by_variant["lr-unfold"]
        row = {"case": case, "batch": ours.batch, "backend": ours.variant}
        for v, r in by_variant.items():
            row[f"{v}_ms"] = round(r.total_ms, 3)
            row[f"{v}_mb"] = round(r.peak_mb, 1)
        row["speedup_vs_unfold"] = round(unfold.total_ms / ours.total_ms, 2)
        row["memory_saving_vs_unfold"] = round(unfold.peak_mb / max(ours.peak_mb, 1e-3), 1)
        row["vs_dwconv7x7"] = round(ours.total_ms / by_variant["dwconv7x7"].total_ms, 2)
        row["vs_conv3x3"] = round(ours.total_ms / by_variant["conv3x3"].total_ms, 2)
        if "lr-reference" in by_variant and ours.variant != "lr-reference":
            row["speedup_vs_reference"] = round(
                by_variant["lr-reference"].total_ms / ours.total_ms, 2
            )
        row["memory_vs_input"] = round(ours.peak_mb / max(ours.input_mb, 1e-6), 2)
        rows.append(row)
    return rows


def as_dicts(results: list[OpTiming]) -> list[dict]:
    return [asdict(r) for r in results]
