"""Static roofline PREDICTIONS for the v2 CUDA kernels on an H100 (no GPU was used).

For each LR-Net-26 stage shape (batch 32, K = 7, m = 8, stride 1, fp32) this counts, from the
kernels' access pattern (kernels/local_relation.cu, 16x8 tiles with halos):
- the op's memory floor (forward: read x, q, k once, write y; backward: read x, gy, q, k, lse
  once, write gx, gq, gk) and its time at the DRAM bandwidth;
- per kernel: DRAM bytes (low: every tensor once, halos hit in L2; high: every halo from
  DRAM), shared-memory bytes, fp32 FMAs and exponentials (on-chip work counted over the tiles'
  padded extent, since threads of partial tiles run masked), each turned into a time at the
  H100 SXM peak (DRAM 3.35 TB/s; shared memory 132 SMs x 128 B/clk x 1.98 GHz = 33.4 TB/s;
  FMA 132 x 128/clk x 1.98 GHz = 33.5 T/s; MUFU 132 x 16/clk x 1.98 GHz = 4.2 T/s).
The predicted range is [max of those times, 2 x that]: the factor 2 is an assumption for the
latency that 12-25% occupancy (ptxas registers, benchmarks/ptxas_report.py) leaves unhidden.

    python benchmarks/roofline.py
"""

from __future__ import annotations

DRAM, SMEM, FMA, MUFU = 3.35e12, 33.4e12, 33.5e12, 4.2e12
TILE_W, TILE_H = 16, 8
SHAPES = [(100, 56), (200, 28), (400, 14), (800, 7)]  # res2..res5 (C, H = W), stride 1
B, K, M, S, F = 32, 7, 8, 1, 4  # batch, window, channels per group, stride, bytes per value


def kernel_rows(C: int, H: int) -> list[tuple[str, float, float, float, float, float]]:
    """(kernel, DRAM low, DRAM high, smem bytes, FMAs, exps) at one stage shape."""
    G, KK, NC = C // M, K * K, (K - 1) // S + 1
    n_in = B * C * H * H  # x, gx, y, gy at stride 1
    n_g = B * G * H * H  # q, k, lse, dsum, gq, gk
    ih, iw = (TILE_H - 1) * S + K, (TILE_W - 1) * S + K
    halo = ih * iw / (TILE_H * S * TILE_W * S)
    oh, ow = (TILE_H + S - 2) // S + NC, (TILE_W + S - 2) // S + NC
    halo_out = oh * ow / (TILE_H * TILE_W)
    # threads of partial tiles run masked: on-chip work scales with the padded plane
    pad = (-(-H // TILE_H) * TILE_H) * (-(-H // TILE_W) * TILE_W) / (H * H)
    n_g_on_chip = n_g * pad
    fwd_low = F * (n_in + 3 * n_g + n_in)  # x, k, q, lse, y
    fwd_high = F * (halo * (n_in + n_g) + 2 * n_g + n_in)
    w = n_g_on_chip
    fwd = ("lr_forward", fwd_low, fwd_high, F * (1 + M) * KK * w, (M + 4) * KK * w, KK * w)
    q_low = F * (2 * n_in + 5 * n_g)  # x, gy, k, q, lse, gq, dsum
    q_high = F * (halo * (n_in + n_g) + n_in + 4 * n_g)
    qry = ("lr_backward_query", q_low, q_high, F * (2 + M) * KK * w, (M + 6) * KK * w,
           KK * w)  # fmt: skip
    i_low = F * (3 * n_in + 5 * n_g)  # x, gy, gx, k, q, lse, dsum, gk
    i_high = F * (halo_out * (n_in + 3 * n_g) + 2 * n_in + 2 * n_g)
    inp = ("lr_backward_input", i_low, i_high, F * (3 + M) * NC * NC * w,
           (2 * M + 5) * NC * NC * w, NC * NC * w)  # fmt: skip
    return [fwd, qry, inp]


def main() -> None:
    print("| stage (CxHxW) | kernel | DRAM MB (low-high) | smem MB | bound by | predicted us |")
    print("|---|---|---|---|---|---|")
    totals = []
    for C, H in SHAPES:
        G = C // M
        n_in, n_g = B * C * H * H, B * G * H * H
        floor_f = F * (2 * n_in + 2 * n_g) / DRAM * 1e6
        floor_b = F * (3 * n_in + 5 * n_g) / DRAM * 1e6
        pred = {}
        for name, low, high, smem, fmas, exps in kernel_rows(C, H):
            times = {"DRAM": high / DRAM, "smem": smem / SMEM, "FMA": fmas / FMA,
                     "MUFU": exps / MUFU}  # fmt: skip
            bound = max(times, key=times.get)
            t = times[bound] * 1e6
            pred[name] = (t, 2 * t)
            print(f"| {C}x{H}x{H} | {name} | {low / 1e6:.0f}-{high / 1e6:.0f} | {smem / 1e6:.0f} "
                  f"| {bound} | {t:.0f}-{2 * t:.0f} |")  # fmt: skip
        fwd = pred["lr_forward"]
        bwd = tuple(pred["lr_backward_query"][i] + pred["lr_backward_input"][i] for i in (0, 1))
        totals.append((f"{C}x{H}x{H}", floor_f, fwd, floor_b, bwd))
    print()
    print(
        "| stage | forward floor us | forward predicted us | x floor | backward floor us "
        "| backward predicted us | x floor |"
    )
    print("|---|---|---|---|---|---|---|")
    for stage, ff, fwd, fb, bwd in totals:
        print(f"| {stage} | {ff:.0f} | {fwd[0]:.0f}-{fwd[1]:.0f} | {fwd[0] / ff:.1f}-"
              f"{fwd[1] / ff:.1f} | {fb:.0f} | {bwd[0]:.0f}-{bwd[1]:.0f} | {bwd[0] / fb:.1f}-"
              f"{bwd[1] / fb:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
