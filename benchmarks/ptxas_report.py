"""ptxas resource usage of every kernel instantiation, through NVRTC (no GPU needed).

Prints one Markdown table row per (kernel, dtype, K, stride, arch): registers, stack frame,
spill stores / loads, static shared memory, and the occupancy those allow on sm_80 / sm_90
(resident 128-thread blocks per SM, limited by registers, shared memory and 2048 threads).

    python benchmarks/ptxas_report.py [--ks 3 5 7 9] [--strides 1 2]
"""

from __future__ import annotations

import argparse

from robustlr.ops.cupy_backend import dynamic_shared_bytes
from robustlr.ops.nvrtc import occupancy, ptxas_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5, 7, 9])
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--archs", nargs="+", default=["sm_80", "sm_90"])
    args = parser.parse_args()
    print(
        "| kernel | dtype | K | stride | arch | registers | stack B | spill st/ld B | smem B "
        "| dynamic smem B | blocks/SM | occupancy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in ptxas_table(args.ks, args.strides, args.archs):
        dynamic = dynamic_shared_bytes(row.kernel, row.kernel_size, row.stride)
        blocks, occ = occupancy(row.usage, row.arch, dynamic=dynamic)
        u = row.usage
        print(
            f"| {row.kernel} | {row.ctype} | {row.kernel_size} | {row.stride} | {row.arch} "
            f"| {u.registers} | {u.stack_frame} | {u.spill_stores}/{u.spill_loads} "
            f"| {u.shared} | {dynamic} | {blocks} | {occ:.0%} |"
        )


if __name__ == "__main__":
    main()
