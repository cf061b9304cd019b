"""Static roofline PREDICTIONS for the CUDA kernels on an H100 SXM, v2 against v3 (no GPU used).

For each LR-Net-26 stage shape (batch 32, K = 7, m = 8, stride 1, fp32) and kernel, the model
derives a time from four resources, each from the kernels themselves, not from assumed factors:

- occupancy: resident warps per SM from ptxas's registers and shared memory
  (``nvrtc.occupancy``). v3: compiled now through NVRTC (sm_90, fp32); v2: the ptxas figures of
  docs/gpu-kernels.md (its source is no longer built);
- DRAM: bytes moved (low: every tensor once, halos hit in L2; high: every halo from DRAM), at
  the lower of the peak bandwidth and what the loads in flight sustain (Little's law: an SM
  sustains resident warps x loads in flight per warp x 128 B per DRAM latency). Loads in flight
  per warp, from the sm_90 SASS of the tile loaders (runs of LDG before the first STS; command
  in docs/gpu-kernels.md): v2 1 (its loop's 4-way unrolled body never runs at 2-3 trips, the
  remainder issues one load per store); v3 min(trips, LR_LOAD_BATCH = 4), 3 at K = 7;
- shared memory: warp requests of the window reads x transactions per request (the static
  bank-conflict count of ``robustlr.ops.bank_model``; 2 for v2 at stride 1, docs/gpu-kernels.md),
  plus the loaders' stores and v3's grad-geo reduction, at 1 transaction per SM per clock;
- fp32 and MUFU (exp) instructions counted per window offset from the kernel loops, on the
  tiles' padded extent (threads of partial tiles run masked).

Predicted range per kernel: [max of the four times (load and compute phases of the resident
blocks overlap fully), DRAM time + max of the on-chip times (no overlap)]; both use the bytes'
low and high figures respectively. H100 SXM: 132 SMs at 1.98 GHz, DRAM 3.35 TB/s, DRAM
latency 600 ns (a parameter: published microbenchmarks give 480-700 ns), 128 fp32 lanes and 16
MUFU lanes per SM.

    python benchmarks/roofline.py            # compiles the v3 kernels with NVRTC (~30 s)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from robustlr.ops import cupy_backend, nvrtc
from robustlr.ops.bank_model import window_read_transactions

SMS, CLOCK, DRAM, LATENCY = 132, 1.98e9, 3.35e12, 600e-9
#: Global loads per thread the v3 tile loader issues before its stores (read from the kernel).
LOAD_BATCH = int(
    re.search(r"#define LR_LOAD_BATCH (\d+)", nvrtc.load_kernel_source("lr_common.cuh")).group(1)
)
FP32_LANES, MUFU_LANES, WARP_LOAD_BYTES = 128, 16, 128
TILE_W, TILE_H = cupy_backend.TILE
SHAPES = [(100, 56), (200, 28), (400, 14), (800, 7)]  # res2..res5 (C, H = W), stride 1
B, K, M, S, F = 32, 7, 8, 1, 4  # batch, window, channels per group, stride, bytes per value
KERNELS = nvrtc.KERNEL_NAMES
#: v2 at K = 7, stride 1, fp32, sm_90 (docs/gpu-kernels.md): registers, static shared bytes,
#: transactions per window read.
V2 = {
    "lr_forward": (112, 1428, 2),
    "lr_backward_query": (244, 7268, 2),
    "lr_backward_input": (168, 5124, 2),
}


@dataclass(frozen=True)
class Work:
    """Per-thread-slot counts of one kernel (forward / backward_query: per output position,
    backward_input: per input position): window-read warp requests, other shared requests,
    fp32 instructions, exps; DRAM bytes of the whole launch (low, high)."""

    window_reads: float
    other_shared: float
    fp32: float
    exps: float
    dram_low: float
    dram_high: float


def work(kernel: str, version: str, C: int, H: int) -> tuple[Work, float]:
    """The counts of one kernel at one stage, and its thread slots (padded positions)."""
    G, KK, NC = C // M, K * K, (K - 1) // S + 1
    n_in, n_g = B * C * H * H, B * G * H * H  # x, gx, y, gy / q, k, lse, dsum, gq, gk
    ih, iw = (TILE_H - 1) * S + K, (TILE_W - 1) * S + K
    halo = ih * iw / (TILE_H * S * TILE_W * S)
    oh, ow = (TILE_H + S - 2) // S + NC, (TILE_W + S - 2) // S + NC
    halo_out = oh * ow / (TILE_H * TILE_W)
    pad = (-(-H // TILE_H) * TILE_H) * (-(-H // TILE_W) * TILE_W) / (H * H)
    slots = n_g * pad
    loader_stores = (1 + M) * ih * iw / (TILE_W * TILE_H)  # per slot: k tile + m x tiles
    if kernel == "lr_forward":
        dram = (F * (n_in + 3 * n_g + n_in), F * (halo * (n_in + n_g) + 2 * n_g + n_in))
        if version == "v2":  # logits once (w[KK]); m channel passes over w
            return Work((1 + M) * KK, KK + loader_stores, (M + 9) * KK, KK, *dram), slots
        # v3: pass 1 (k, geo, max), pass 2 (k, geo, exp, m accumulators)
        return Work((2 + M) * KK, 2 * KK + loader_stores, (M + 13) * KK, KK, *dram), slots
    if kernel == "lr_backward_query":
        low, high = F * (2 * n_in + 5 * n_g), F * (halo * (n_in + n_g) + n_in + 4 * n_g)
        if version == "v2":  # w, dw[KK] over m channels, then dl and grad q
            return Work((2 + M) * KK, KK + loader_stores, (M + 12) * KK, KK, low, high), slots
        # v3 also reads y for D; per offset: k, geo, m x, dl stored and reduced
        dram = (low + F * n_in, high + F * n_in)
        return Work((1 + M) * KK, 3 * KK + loader_stores, (M + 11) * KK, KK, *dram), slots
    # backward_input: per covering output q, geo, lse, D, then m gy; same in v2 and v3
    dram = (F * (3 * n_in + 5 * n_g), F * (halo_out * (n_in + 3 * n_g) + 2 * n_in + 2 * n_g))
    stores = (3 + M) * oh * ow / (TILE_W * TILE_H)
    return Work((4 + M) * NC * NC, stores, (2 * M + 9) * NC * NC, NC * NC, *dram), slots


def v3_usage() -> dict[str, nvrtc.PtxasUsage]:
    """ptxas's report for the current kernels (K, stride 1, fp32, sm_90)."""
    rows = nvrtc.ptxas_table((K,), (S,), ("sm_90",), ("float",))
    return {r.kernel: r.usage for r in rows}


def loads_in_flight(kernel: str, version: str) -> int:
    """Global loads a warp of the tile loader keeps in flight (see the module docstring)."""
    if version == "v2":
        return 1
    if kernel == "lr_backward_input":
        nc = (K - 1) // S + 1
        elements = ((TILE_H + S - 2) // S + nc) * ((TILE_W + S - 2) // S + nc)
    else:
        elements = ((TILE_H - 1) * S + K) * ((TILE_W - 1) * S + K)
    return min(-(-elements // (TILE_W * TILE_H)), LOAD_BATCH)


def predict(kernel: str, version: str, C: int, H: int, usage: nvrtc.PtxasUsage, conflicts: int):
    """(low us, high us, bound, resident warps per SM) of one kernel at one stage."""
    w, slots = work(kernel, version, C, H)
    blocks, _ = nvrtc.occupancy(usage, "sm_90")
    warps = blocks * TILE_W * TILE_H // 32
    in_flight = warps * loads_in_flight(kernel, version) * WARP_LOAD_BYTES
    bandwidth = min(DRAM, SMS * in_flight / LATENCY)
    warp_slots = slots / 32
    smem = warp_slots * (w.window_reads * conflicts + w.other_shared) / (SMS * CLOCK)
    fp32 = slots * w.fp32 / (SMS * FP32_LANES * CLOCK)
    mufu = slots * w.exps / (SMS * MUFU_LANES * CLOCK)
    on_chip = {"smem": smem, "fp32": fp32, "MUFU": mufu}
    times = {"DRAM": w.dram_low / bandwidth, **on_chip}
    bound = max(times, key=times.get)
    high = w.dram_high / bandwidth + max(on_chip.values())
    return times[bound] * 1e6, high * 1e6, bound, warps


def main() -> None:
    usage = v3_usage()
    versions = {
        "v2": {k: (nvrtc.PtxasUsage(r, 0, 0, 0, s), c) for k, (r, s, c) in V2.items()},
        "v3": {k: (usage[k], window_read_transactions(k, K, S)) for k in KERNELS},
    }
    print("| stage (CxHxW) | kernel | version | registers | warps/SM | loads in flight/warp "
          "| transactions/read | bound by | predicted us |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    totals: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for C, H in SHAPES:
        for kernel in KERNELS:
            for version, table in versions.items():
                u, conflicts = table[kernel]
                low, high, bound, warps = predict(kernel, version, C, H, u, conflicts)
                direction = "forward" if kernel == "lr_forward" else "backward"
                totals.setdefault((f"{C}x{H}x{H}", version), []).append((direction, low, high))
                print(f"| {C}x{H}x{H} | {kernel} | {version} | {u.registers} | {warps} "
                      f"| {loads_in_flight(kernel, version)} | {conflicts} | {bound} "
                      f"| {low:.0f}-{high:.0f} |")  # fmt: skip
    print()
    print("| stage | version | forward floor us | forward predicted us | x floor "
          "| backward floor us | backward predicted us | x floor |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for C, H in SHAPES:
        G = C // M
        n_in, n_g = B * C * H * H, B * G * H * H
        floor_f = F * (2 * n_in + 2 * n_g) / DRAM * 1e6
        floor_b = F * (3 * n_in + 5 * n_g) / DRAM * 1e6
        for version in versions:
            rows = totals[(f"{C}x{H}x{H}", version)]
            fl, fh = (sum(r[i] for r in rows if r[0] == "forward") for i in (1, 2))
            bl, bh = (sum(r[i] for r in rows if r[0] == "backward") for i in (1, 2))
            print(f"| {C}x{H}x{H} | {version} | {floor_f:.0f} | {fl:.0f}-{fh:.0f} "
                  f"| {fl / floor_f:.1f}-{fh / floor_f:.1f} | {floor_b:.0f} | {bl:.0f}-{bh:.0f} "
                  f"| {bl / floor_b:.1f}-{bh / floor_b:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
