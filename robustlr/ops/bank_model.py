"""Static shared-memory bank-conflict count of the CUDA kernels' window reads (no GPU).

The address each lane of a warp reads is evaluated from the kernels' own index expressions
(kernels/local_relation.cu, mirrored here; the layout functions are those of
``cupy_backend``), and a warp request of 4-byte words costs as many transactions as the most
distinct words that fall in one of the 32 banks (a request of 2- or 4-word vector accesses is
served in 2 or 4 phases of lanes, each costing the same way). tests/test_kernels_budget.py
requires the fewest for every kernel, K = 3..13, strides 1-3; benchmarks/roofline.py counts
every window read at that fewest.
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


def vector_transactions(indices: list[int], width: int) -> int:
    """Shared-memory wavefronts of one warp request of ``width``-word accesses (``lr_read_vec``):
    lane i reads words ``indices[i] * width + e``, e < width. The warp is served in ``width``
    phases of 32 / width consecutive lanes, each as many wavefronts as ``transactions`` of its
    words: at least ``width`` in all."""
    per = len(indices) // width
    return sum(
        transactions(
            [i * width + e for i in indices[ph * per : (ph + 1) * per] for e in range(width)]
        )
        for ph in range(width)
    )


def window_read_transactions(kernel: str, kernel_size: int, stride: int) -> float:
    """Worst warp request over the window reads of one kernel, in wavefronts over the fewest a
    request of its width takes (1: conflict-free). 16 x 8 block, warp w = thread rows 2w and
    2w + 1, each thread a vertical strip of R positions (``cupy_backend.strip``): forward /
    backward_query read ``tile[ty*R*S*PW + tx + t*PW + lr_phase_col(b)]`` of a phase-ordered
    tile (``lr_load_phased``) for every strip row t and window column b: one word of the k
    tile, and V = ``cupy_backend.vector_width`` words of each group of channel tiles (channels
    side by side, ``vector_transactions``); backward_query also adds into its thread row's
    key-gradient copy, ``copies[ty*GS + tx + t*PW + lr_phase_col(b)]``
    (``cupy_backend.key_grad_pitch``); forward_packed reads its slots' tiles
    (``cupy_backend.packed_shape``) the same way, from each thread's slot, the pairs kernels
    theirs (``cupy_backend.pairs_shape``, ``pairs_input_shape``: slots a tile wide, four thread
    rows each; backward_input's at stride 1 only), backward_query_pairs its two slots of a
    whole tile (``cupy_backend.pairs_query_shape``, stride 1: lanes 0-15 of a warp in one slot,
    16-31 in the other, at the same thread row of either pass), and
    backward_input_packed its slots' output tiles (``cupy_backend.packed_input_shape``, stride 1;
    none at other strides, where it is not launched); backward_input reads
    q, lse (one word) and gy (V words) at
    ``tile[(i_first - oi0)*PO + (j_first - oj0) + t*PO + tj]`` for every tile origin modulo S."""
    K, S = kernel_size, stride
    R = cupy_backend.strip(kernel, K, S)
    V = cupy_backend.vector_width(kernel, K, S)
    tw, th = cupy_backend.TILE
    worst = 0.0
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
                    worst = max(worst, transactions(req), vector_transactions(req, V) / V)
                    if kernel == "lr_backward_query":
                        req = [ty * copy + tx + row * pw + col for tx, ty in lanes]
                        worst = max(worst, transactions(req))
        elif kernel == "lr_backward_query_pairs":
            # stride 1 only (not launched otherwise): slot z = ty % 2 (a warp holds a thread row
            # of each, lanes 0-15 and 16-31), thread row vy = ty // 2 + 4 * pass: reads
            # slot[z * SLOT + vy*R*S*PW + tx + t*PW + lr_phase_col(b)] and adds into copy
            # vy * 2 + z at the same offset in it
            if S != 1:
                continue
            packed = cupy_backend.pairs_query_shape(K, S)
            pw = packed.pitch
            for p in range(cupy_backend.QUERY_PAIR_PASSES):
                rows_of = [(ty // 2 + p * th // 2, ty % 2) for _, ty in lanes]
                for row in range((R - 1) * S + K):
                    for b in range(K):
                        col = cupy_backend.phase_col(b, packed.cols, S)
                        at = [
                            vy * R * S * pw + tx + row * pw + col
                            for (tx, _), (vy, _) in zip(lanes, rows_of, strict=True)
                        ]
                        req = [a + z * packed.slot for a, (_, z) in zip(at, rows_of, strict=True)]
                        worst = max(worst, transactions(req), vector_transactions(req, V) / V)
                        req = [
                            (vy * 2 + z) * packed.copy + a - vy * R * S * pw
                            for a, (vy, z) in zip(at, rows_of, strict=True)
                        ]
                        worst = max(worst, transactions(req))
        elif kernel in cupy_backend.PACKED_KERNELS:
            # slot z = (ty // TR) * 2 + tx // SLOT_WIDTH (TR thread rows each: 4 in
            # backward_query, 2 otherwise), strip (ty % TR, tx % SLOT_WIDTH): reads
            # slot[z * SLOT + (ty % TR)*R*S*PW + tx % SLOT_WIDTH + t*PW + lr_phase_col(b)];
            # the pairs kernels: slots of the tile's width, z = ty // TR (TR = 4);
            # backward_query adds the key gradient into copy ty * 2 + tx // SLOT_WIDTH at the
            # same offset in it. backward_input_packed: stride 1 only (not launched otherwise)
            if kernel in cupy_backend.STRIDE_ONE_KERNELS and S != 1:
                continue
            packed, sw = cupy_backend.packed_geometry(kernel, K, S), cupy_backend.SLOT_WIDTH
            if kernel in cupy_backend.PAIR_KERNELS:
                sw = tw
            tr, pw, across = packed.slot_rows // R, packed.pitch, tw // sw
            for row in range((R - 1) * S + K):
                for b in range(K):
                    col = cupy_backend.phase_col(b, packed.cols, S)
                    at = [(ty % tr) * R * S * pw + tx % sw + row * pw + col for tx, ty in lanes]
                    slot = [((ty // tr) * across + tx // sw) * packed.slot for tx, ty in lanes]
                    req = [a + z for a, z in zip(at, slot, strict=True)]
                    worst = max(worst, transactions(req), vector_transactions(req, V) / V)
                    if packed.copy:
                        req = [
                            (ty * 2 + tx // sw) * packed.copy + a - (ty % tr) * R * S * pw
                            for a, (tx, ty) in zip(at, lanes, strict=True)
                        ]
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
                        worst = max(worst, transactions(req), vector_transactions(req, V) / V)
        else:
            raise KeyError(kernel)
    return worst


def loader_store_transactions(
    rows: int, cols: int, pitch: int, width: int, stride: int = 1, rotated: bool = True
) -> tuple[int, float]:
    """(worst, mean) transactions of the tile loader's shared stores over one ROWS x COLS tile
    staged at ``pitch`` in phase order (``lr_load_planes``, SLOTS = 1) with groups of ``width``
    planes side by side: lane ``tid`` of a 128-thread block copies position ``tid + 128 t`` of
    every plane, to word ``idx * width + plane % width`` of its group (idx its staged index);
    at the loop's plane p it takes the group's plane ``(p + lane // (32 / width)) % width``
    (``rotated``, the kernels' order) or plane p (every lane the same plane, for the
    comparison). A warp's 32 positions span row breaks of the padded pitch, so some requests
    are 2-way conflicted in either order; without the rotation every request of ``width``
    >= 2 is at least ``width``-way."""
    count = rows * cols
    seen: list[int] = []
    for trip in range(-(-count // 128)):
        for warp in range(4):
            for p in range(width):
                req = []
                for lane in range(32):
                    e = 32 * warp + lane + 128 * trip
                    if e >= count:
                        continue
                    row, col = divmod(e, cols)
                    idx = row * pitch + cupy_backend.phase_col(col, cols, stride)
                    plane = (p + lane // (32 // width)) % width if rotated else p
                    req.append(idx * width + plane)
                if req:
                    seen.append(transactions(req))
    return max(seen), sum(seen) / len(seen)
