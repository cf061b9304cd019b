"""Static shared-memory bank-conflict count of the CUDA kernels' window reads (no GPU).

The address each lane of a warp reads is evaluated from the kernels' own index expressions
(kernels/local_relation.cu, mirrored here; the layout functions are those of
``cupy_backend``), and a warp request of 4-byte words costs as many transactions as the most
distinct words that fall in one of the 32 banks. tests/test_kernels_budget.py requires 1 for
every kernel, K = 3..13, strides 1-3; benchmarks/roofline.py uses the count in its prediction.
"""

from __future__ import annotations

from robustlr.ops import cupy_backend

BANKS = 32


def transactions(addresses: list[int]) -> int:
    """Shared-memory transactions of one warp request of 4-byte words: the most distinct words
    that fall in one of the 32 banks (lanes reading the same word share it)."""
    per_bank: dict[int, set[int]] = {}
    for a in addresses:
        per_bank.setdefault(a % BANKS, set()).add(a)
    return max(len(words) for words in per_bank.values())


def window_read_transactions(kernel: str, kernel_size: int, stride: int) -> int:
    """Worst warp request over the window reads of one kernel (16 x 8 block, warp w = thread
    rows 2w and 2w + 1, each thread a vertical strip of R positions, ``cupy_backend.strip``):
    forward / backward_query read ``tile[ty*R*S*PW + tx + t*PW + lr_phase_col(b)]`` of a
    phase-ordered tile (``lr_load_phased``) for every strip row t and window column b, for
    every staged channel; backward_query also adds into its thread row's key-gradient copy,
    ``copies[ty*GS + tx + t*PW + lr_phase_col(b)]`` (``cupy_backend.key_grad_pitch``);
    backward_input reads ``tile[(i_first - oi0)*PO + (j_first - oj0) + t*PO + tj]`` for every
    tile origin modulo S."""
    K, S = kernel_size, stride
    R = cupy_backend.strip(kernel, K, S)
    tw, th = cupy_backend.TILE
    worst = 0
    for warp in range(tw * th // 32):
        lanes = [(t % tw, t // tw) for t in range(32 * warp, 32 * warp + 32)]
        if kernel in ("lr_forward", "lr_backward_query"):
            iw = (tw - 1) * S + K
            pw = cupy_backend.shared_pitch(iw, S, R * S)
            copy = cupy_backend.key_grad_pitch(K, S, R)
            for row in range((R - 1) * S + K):
                for b in range(K):
                    col = cupy_backend.phase_col(b, iw, S)
                    req = [ty * R * S * pw + tx + row * pw + col for tx, ty in lanes]
                    worst = max(worst, transactions(req))
                    if kernel == "lr_backward_query":
                        req = [ty * copy + tx + row * pw + col for tx, ty in lanes]
                        worst = max(worst, transactions(req))
        elif kernel == "lr_backward_input":
            nc = (K - 1) // S + 1
            po = cupy_backend.plain_pitch((tw + S - 2) // S + nc, S, R)
            P = K // 2
            for r0 in range(S):  # tile origins h0, w0 modulo S
                first0 = (r0 + P - K + S) // S
                for row in range((R + S - 2) // S + nc):
                    for tj in range(nc):
                        req = [
                            ((r0 + ty * R + P - K + S) // S - first0) * po
                            + ((r0 + tx + P - K + S) // S - first0)
                            + row * po
                            + tj
                            for tx, ty in lanes
                        ]
                        worst = max(worst, transactions(req))
        else:
            raise KeyError(kernel)
    return worst
