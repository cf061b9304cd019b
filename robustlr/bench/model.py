"""End-to-end training-step throughput of registered models (DESIGN.md §8).

One step = forward + cross-entropy + backward + SGD (momentum) step on random [0, 1] images.
Each arch is warmed up, then ``repeats`` steps are timed one by one and the median is kept
(CUDA events around each step on a GPU, ``time.perf_counter`` on the CPU). Timings are meant
as ratios between archs measured side by side in one run. On a CPU shared with other jobs,
wall-clock steps are meaningless (threads wait for cores); ``cpu_time=True`` times each step in
CPU time instead (``cpu_clock``): with one intra-op thread that is the step's own work only.

Peak memory is what the training step needs on top of what was in use before the model was
built (weights, gradients, optimizer state, activations and workspace):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the model was built (exact, allocator-level).
- CPU: the process's resident set size sampled every millisecond by a thread during the timed
  steps (from ``/proc/self/statm``, Linux only; None elsewhere), peak minus the RSS before the
  model was built, after a ``malloc_trim`` that hands freed heap memory back to the OS. It is a
  sampled lower bound: short spikes between samples, or memory the allocator kept from an
  earlier arch, can be missed.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from robustlr.models import count_params, create_model

log = logging.getLogger(__name__)

_STATM = "/proc/self/statm"


def resolve_device(device: str | torch.device) -> torch.device:
    """Resolve "auto" to cuda when available, else cpu; CUDA without CUDA is a ValueError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return resolved


def _rss_bytes() -> int | None:
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), where there is one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("malloc_trim unavailable; CPU peak memory may be underestimated")


class _RssSampler:
    """Peak RSS seen by a background thread sampling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()


def cpu_clock() -> Callable[[], float]:
    """CPU-time clock for a shared machine: the calling thread's CPU time with one intra-op
    thread (no other thread's work, e.g. a memory sampler, is counted), else the process's."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def _time_steps(step, repeats: int, device: torch.device, cpu_time: bool = False) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step``."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            clock = cpu_clock() if cpu_time else time.perf_counter
            t0 = clock()
            step()
            times.append(clock() - t0)
    return times


def bench_model(
    arch: str,
    input_size: int,
    batch_size: int,
    device: torch.device,
    repeats: int = 5,
    warmup: int = 2,
    small_input: bool = False,
    num_classes: int = 1000,
    channels_last: bool = False,
    cpu_time: bool = False,
    **options: object,
) -> dict[str, object]:
    """Time the training step of one arch; see ``bench_models`` for the row's keys."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        _trim_heap()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _trim_heap()
        base = _rss_bytes()
    model = create_model(arch, num_classes=num_classes, small_input=small_input, **options)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(batch_size, 3, input_size, input_size, generator=generator)
    images = images.to(device=device, memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)

    def step() -> None:
        _train_step(model, optimizer, images, labels)

    log.info("bench %s: %d warm-up and %d timed steps on %s", arch, warmup, repeats, device)
    _time_steps(step, warmup, device)
    if device.type == "cuda":
        times = _time_steps(step, repeats, device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method = "cuda_max_allocated"
    else:
        with _RssSampler() as sampler:
            times = _time_steps(step, repeats, device, cpu_time)
        peak = None if base is None else sampler.peak - base
        method = "rss_sampled" if base is not None else "unavailable"
    median = statistics.median(times)
    row = {
        "arch": arch,
        "device": str(device),
        "input_size": input_size,
        "batch_size": batch_size,
        "small_input": small_input,
        "params_m": count_params(model) / 1e6,
        "step_ms": median * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "images_per_s": batch_size / median,
        "peak_mem_mb": None if peak is None else peak / 2**20,
        "mem_method": method,
        "repeats": repeats,
        "clock": "process_cpu" if cpu_time and device.type == "cpu" else "wall",
        "threads": torch.get_num_threads(),
    }
    return row


def bench_models(
    archs: Sequence[str],
    input_size: int,
    batch_size: int,
    device: str | torch.device = "auto",
    repeats: int = 5,
    warmup: int = 2,
    small_input: bool | None = None,
    num_classes: int = 1000,
    channels_last: bool = False,
    cpu_time: bool = False,
    **options: object,
) -> list[dict[str, object]]:
    """Training-step throughput of each arch, side by side on one device.

    ``small_input`` None means the small-image stem for inputs below 64 pixels. Each row has
    arch, device, input_size, batch_size, small_input, params_m, step_ms (median of repeats),
    step_ms_min, step_ms_max, images_per_s, peak_mem_mb, mem_method, repeats, and
    ``ratio``: step time / that of the reference, the first arch named that is a ResNet
    (else the first arch), named in ``reference``.
    """
    if not archs:
        raise ValueError("give at least one arch")
    if input_size < 1 or batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("input_size, batch_size and repeats must be >= 1, warmup >= 0")
    resolved = resolve_device(device)
    small = input_size < 64 if small_input is None else small_input
    rows = [
        bench_model(
            arch,
            input_size,
            batch_size,
            resolved,
            repeats=repeats,
            warmup=warmup,
            small_input=small,
            num_classes=num_classes,
            channels_last=channels_last,
            cpu_time=cpu_time,
            **options,
        )
        for arch in archs
    ]
    reference = next((a for a in archs if a.startswith("resnet")), archs[0])
    ref_ms = next(r["step_ms"] for r in rows if r["arch"] == reference)
    for row in rows:
        row["reference"] = reference
        row["ratio"] = row["step_ms"] / ref_ms
    return rows
