"""Launch planning of the CuPy backend: pure functions of the shape, tested for 64-bit sizes
without allocating anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustlr.ops import cupy_backend as cb
from robustlr.ops.contract import LocalRelationShape


def shape_of(B, C, H, W, G, K, s) -> LocalRelationShape:
    m = -(-C // G)
    return LocalRelationShape(B, C, H, W, G, m, (H - 1) // s + 1, (W - 1) // s + 1, K, s, 1)


def tiles(h: int, w: int, strip: int) -> int:
    """Tiles of TILE[0] x TILE[1] threads, each a vertical strip of ``strip`` positions."""
    tw, th = cb.TILE
    return -(-h // (th * strip)) * -(-w // tw)


@pytest.mark.parametrize(
    "sizes",
    [
        (1, 1, 1, 1, 1, 3, 1),
        (32, 100, 56, 56, 13, 7, 1),  # LR-Net-26 res2 at 224
        (4096, 800, 512, 512, 100, 7, 2),  # B*G*H*W > 2**37: 64-bit counts
        (2**20, 2**12, 2**10, 2**10, 2**9, 9, 3),  # beyond 2**48 elements
    ],
)
def test_plans_cover_64bit_sizes(sizes):
    shape = shape_of(*sizes)
    B, _, H, W, G, K, s = sizes
    Ho, Wo = shape.out_height, shape.out_width
    rows, in_rows = cb.query_strip(K, s), cb.input_strip(K, s)
    fwd = cb.plan_forward(shape)
    assert fwd.block == (*cb.TILE, 1)
    if Ho <= 2 * cb.forward_strip(K, s) and Wo <= 8:  # small images: 8 per block
        assert fwd.kernel == "lr_forward_packed"
        assert fwd.grid == (min(G * -(-B // 8), cb.MAX_BLOCKS), 1, 1)
    elif Ho <= 4 * cb.forward_strip(K, s) and Wo <= 16:  # half a tile's rows: 2 per block
        assert fwd.kernel == "lr_forward_pairs"
        assert fwd.grid == (min(G * -(-B // 2), cb.MAX_BLOCKS), 1, 1)
    else:
        assert fwd.kernel == "lr_forward" and fwd.shared_bytes == 0
        fwd_tiles = tiles(Ho, Wo, cb.forward_strip(K, s))
        assert fwd.grid == (min(B * G * fwd_tiles, cb.MAX_BLOCKS), 1, 1)
    bwd = cb.plan_backward_input(shape)
    if s == 1 and max(H, W) <= 8 and K <= 7:  # small images (8 x 8 inputs): 8 per block
        assert bwd.kernel == "lr_backward_input_packed"
        assert bwd.grid == (min(G * -(-B // 8), cb.MAX_BLOCKS), 1, 1)
    elif s == 1 and max(H, W) <= 16:  # half a tile's rows: 2 per block
        assert bwd.kernel == "lr_backward_input_pairs"
        assert bwd.grid == (min(G * -(-B // 2), cb.MAX_BLOCKS), 1, 1)
    else:
        assert bwd.kernel == "lr_backward_input" and bwd.shared_bytes == 0
        assert bwd.grid == (min(B * G * tiles(H, W, in_rows), cb.MAX_BLOCKS), 1, 1)
    blocks_per_sm = cb.THREADS_PER_SM // (cb.TILE[0] * cb.TILE[1])
    query_tiles = B * tiles(Ho, Wo, rows)
    if Ho <= 4 * rows and Wo <= 8 and cb.packed_query_bytes(K, s) <= 80 * 1024:  # 4 per tile
        query_tiles = -(-B // 4)
        per_sm = 228 * 1024 // (cb.packed_query_bytes(K, s) + 1024)
        blocks_per_sm = min(blocks_per_sm, per_sm)
    for sms in (1, 108, 132):
        n = cb.query_chunks(shape, sms)
        assert n == max(1, min(query_tiles, -(-sms * blocks_per_sm // G)))
        q = cb.plan_backward_query(shape, n)
        assert q.grid == (G * n, 1, 1) and G * n <= cb.MAX_BLOCKS
        # the grad-geo partial buffer stays proportional to the GPU, not to the problem
        assert G * K * K * n <= K * K * (sms * blocks_per_sm + G)
    for config in (fwd, bwd):
        assert all(isinstance(v, int) for v in (*config.grid, *config.block))
        assert config.grid[0] <= 2**31 - 1 and config.block[0] * config.block[1] <= 1024


@pytest.mark.parametrize(
    ("sizes", "packed", "packed_query", "packed_input"),
    [
        ((32, 800, 7, 7, 100, 7, 1), True, True, True),  # LR-Net-26 res5 at 224: 7 x 7
        ((9, 16, 8, 8, 2, 7, 1), True, True, True),  # a whole slot: 8 x 8 outputs
        ((9, 16, 9, 8, 2, 7, 1), False, False, False),  # one row more than a slot
        ((9, 16, 8, 9, 2, 7, 1), False, False, False),  # one column more
        ((9, 16, 4, 8, 2, 9, 1), True, True, False),  # K = 9: 98 KB backward input
        ((9, 16, 8, 16, 2, 5, 2), True, True, False),  # stride 2: 4 x 8 outputs
        ((9, 16, 9, 16, 2, 5, 2), False, True, False),  # 5 x 8 outputs: 4 strips of 2 in a slot
        ((9, 16, 8, 16, 2, 7, 2), False, False, False),  # K = 7, stride 2: 88 KB and 84 KB
        ((9, 16, 4, 4, 2, 7, 3), False, False, False),  # K = 7, stride 3: 170 KB
    ],
)
def test_small_images_take_the_packed_kernels(sizes, packed, packed_query, packed_input):
    """lr_forward_packed runs where the outputs fit a slot of 8 columns x 2 strips,
    lr_backward_query_packed where they fit 8 columns x 4 strips, and lr_backward_input_packed
    at stride 1 where the inputs fit 8 x 2 strips, each where its dynamic shared memory fits
    80 KB (two blocks per SM on sm_80); their blocks hold 8 (the query's 4) images of a group."""
    shape = shape_of(*sizes)
    B, G = sizes[0], sizes[4]
    fwd, bwd = cb.plan_forward(shape), cb.plan_backward_input(shape)
    assert (fwd.kernel == "lr_forward_packed") == packed
    assert (bwd.kernel == "lr_backward_input_packed") == packed_input
    query = cb.plan_backward_query(shape, cb.query_chunks(shape, 132))
    assert (query.kernel == "lr_backward_query_packed") == packed_query
    if packed_query:
        assert query.shared_bytes == cb.packed_query_bytes(*sizes[5:]) <= 80 * 1024
        # 4 images per tile; blocks: what 132 SMs hold at once by shared memory, per group
        per_sm = 228 * 1024 // (query.shared_bytes + 1024)
        assert cb.query_chunks(shape, 132) == min(-(-B // 4), -(-132 * per_sm // G))
    if packed:
        assert fwd.grid == (G * -(-B // 8), 1, 1)
        assert 48 * 1024 < fwd.shared_bytes <= 80 * 1024
        assert fwd.shared_bytes == cb.packed_shared_bytes(*sizes[5:])
    if packed_input:
        assert bwd.grid == (G * -(-B // 8), 1, 1)
        assert 48 * 1024 < bwd.shared_bytes <= 80 * 1024
        assert bwd.shared_bytes == cb.packed_input_bytes(sizes[5])


@pytest.mark.parametrize(
    ("sizes", "pairs", "input_pairs"),
    [
        ((32, 400, 14, 14, 50, 7, 1), True, True),  # LR-Net-26 res4 at 224: 14 x 14
        ((9, 16, 16, 16, 2, 7, 1), True, True),  # a whole slot: 16 x 16 (four strips of 4)
        ((9, 16, 17, 16, 2, 7, 1), False, False),  # one row more than a slot
        ((9, 16, 16, 17, 2, 7, 1), False, False),  # one column more
        ((9, 16, 8, 8, 2, 7, 1), False, False),  # a slot of the packed kernels
        ((9, 16, 16, 32, 2, 3, 2), True, False),  # stride 2 (strips of 2): 8 x 16 outputs
        ((9, 16, 16, 16, 2, 3, 2), True, False),  # stride 2: no backward-input pairs
        ((9, 16, 16, 16, 2, 9, 1), False, True),  # K = 9: forward strips of 2 (8 rows a slot)
        ((9, 16, 6, 8, 2, 13, 1), True, True),  # K = 13: 58 KB forward, 62 KB backward input
    ],
)
def test_short_images_take_the_pairs_kernels(sizes, pairs, input_pairs):
    """lr_forward_pairs runs where the outputs fit a tile's 16 columns and half its rows (four
    strips) but not a slot of lr_forward_packed, lr_backward_input_pairs where the inputs do at
    stride 1, each within 80 KB: two images of a group per block, every warp on one of them."""
    shape = shape_of(*sizes)
    B, G, K, s = sizes[0], sizes[4], sizes[5], sizes[6]
    fwd, bwd = cb.plan_forward(shape), cb.plan_backward_input(shape)
    assert (fwd.kernel == "lr_forward_pairs") == pairs
    assert (bwd.kernel == "lr_backward_input_pairs") == input_pairs
    if pairs:
        assert fwd.grid == (G * -(-B // 2), 1, 1)
        assert fwd.shared_bytes == cb.pairs_shared_bytes(K, s) <= 80 * 1024
    if input_pairs:
        assert bwd.grid == (G * -(-B // 2), 1, 1)
        assert bwd.shared_bytes == cb.pairs_input_bytes(K) <= 80 * 1024


@pytest.mark.parametrize(
    ("sizes", "query_pairs"),
    [
        ((32, 400, 14, 14, 50, 7, 1), True),  # LR-Net-26 res4 at 224: 14 x 14
        ((9, 16, 16, 16, 2, 7, 1), True),  # one whole tile: 16 x 16 (eight strips of 2)
        ((9, 16, 17, 16, 2, 7, 1), False),  # one row more than a tile
        ((9, 16, 16, 17, 2, 7, 1), False),  # one column more
        ((9, 16, 8, 8, 2, 7, 1), False),  # a slot of lr_backward_query_packed
        ((9, 16, 9, 8, 2, 7, 1), True),  # one row more than a packed slot
        ((9, 16, 29, 29, 2, 3, 2), False),  # stride 2: 15 x 15 outputs, the tiled kernel
        ((9, 16, 16, 16, 2, 9, 1), True),  # K = 9: 64 KB
        ((9, 16, 16, 16, 2, 11, 1), False),  # K = 11: over 80 KB
    ],
)
def test_images_of_one_tile_take_the_query_pairs_kernel(sizes, query_pairs):
    """lr_backward_query_pairs runs at stride 1 where the outputs fit one tile of
    lr_backward_query (16 columns, eight strips) but not a slot of lr_backward_query_packed,
    within 80 KB: two images of a group per tile; its grid, as the packed kernel's, aims for
    the blocks an SM holds at once by its shared memory."""
    shape = shape_of(*sizes)
    B, G, K = sizes[0], sizes[4], sizes[5]
    chunks = cb.query_chunks(shape, 132)
    query = cb.plan_backward_query(shape, chunks)
    assert (query.kernel == "lr_backward_query_pairs") == query_pairs
    if query_pairs:
        assert query.grid == (G * chunks, 1, 1)
        assert query.shared_bytes == cb.pairs_query_bytes(K, 1) <= 80 * 1024
        per_sm = 228 * 1024 // (query.shared_bytes + 1024)
        assert chunks == min(-(-B // 2), -(-132 * min(per_sm, 16) // G))


def test_empty_problems_launch_nothing():
    shape = shape_of(0, 4, 5, 5, 2, 3, 1)
    assert cb.plan_forward(shape) is None
    assert cb.plan_backward_input(shape) is None
    assert cb.plan_backward_query(shape, cb.query_chunks(shape, 4)) is None


def test_query_grid_fills_the_sms_for_lrnet_shapes():
    """At LR-Net-26 res2 (batch 32, 56x56, G = 13) the query kernel runs at least as many
    threads as an H100 holds (the old fixed 65,536 threads filled a quarter of it); at res5
    (7x7, G = 100) the packed kernel's grid is what an H100 holds at once by its 58 KB of
    shared memory (3 blocks per SM, 396 in all): 4 blocks per group of 8 tiles of 4 images."""
    res2 = shape_of(32, 100, 56, 56, 13, 7, 1)
    block = cb.TILE[0] * cb.TILE[1]
    assert res2.groups * cb.query_chunks(res2, 132) * block >= 132 * cb.THREADS_PER_SM
    res5 = shape_of(32, 800, 7, 7, 100, 7, 1)
    assert cb.plan_backward_query(res5, 4).kernel == "lr_backward_query_packed"
    assert cb.query_chunks(res5, 132) == 4
    assert res5.groups * cb.query_chunks(res5, 132) >= 3 * 132


def test_tile_shape_matches_the_kernels():
    from robustlr.ops.nvrtc import load_kernel_source

    text = load_kernel_source("local_relation.cu")
    assert f"#define LR_TILE_W {cb.TILE[0]}" in text
    assert f"#define LR_TILE_H {cb.TILE[1]}" in text


def test_pack_arg_is_what_cupy_receives():
    t = torch.zeros(3)
    assert cb.pack_arg(t) == np.uint64(t.data_ptr()) and type(cb.pack_arg(t)) is np.uint64
    assert type(cb.pack_arg(np.int32(3))) is np.int32
    with pytest.raises(TypeError, match="numpy scalars"):
        cb.pack_arg(3)


@pytest.mark.parametrize(
    ("sizes", "fits"),
    [
        ((1, 1, 1, 2**31 - 1, 1, 3, 1), True),  # a plane of MAX_OFFSET positions
        ((1, 1, 1, 2**31, 1, 3, 1), False),  # one more
        ((2, 4, 2**16, 2**15, 4, 3, 2), False),  # 2^31 inputs (outputs: a quarter), m = 1
        ((2, 8, 2**15, 2**13, 4, 3, 1), True),  # m = 2 channels of 2^28: 2^29 positions
        ((2, 8, 2**15, 2**13, 1, 3, 1), False),  # m = 8 channels of 2^28: 2^31
        ((8, 2**22, 7, 7, 2**19, 7, 1), True),  # packed: 8 images of 2^22 x 49 < 2^31
        ((8, 2**23, 7, 7, 2**20, 7, 1), False),  # packed: 8 images of 2^23 x 49 >= 2^31
        # lr_forward_pairs (9 rows > a slot of lr_forward_packed): 2 images of 2^23 x 81 < 2^31
        ((8, 2**23, 9, 9, 2**20, 7, 1), True),
        ((8, 2**22, 14, 14, 2**19, 7, 1), True),  # pairs: 2 images of 2^22 x 196 < 2^31
        ((8, 2**23, 14, 14, 2**20, 7, 1), False),  # pairs: 2 images of 2^23 x 196 >= 2^31
        ((8, 2**23, 17, 17, 2**20, 7, 1), True),  # 17 rows: lr_forward, planes only
        # backward tile lists (backward_tiles): 2^13 groups x 2^15 images x 6 input tiles of
        # 40 x 40 is 1.6e9 < 2^31; twice the groups, 3.2e9
        ((2**15, 2**13, 40, 40, 2**13, 3, 1), True),
        ((2**15, 2**14, 40, 40, 2**14, 3, 1), False),
        # backward_query's list per group: 2^31 / 9 images of 9 output tiles (48 x 48, one
        # group) fit; one image more does not
        ((2**31 // 9, 1, 48, 48, 1, 3, 1), True),
        ((2**31 // 9 + 1, 1, 48, 48, 1, 3, 1), False),
    ],
)
def test_32bit_offsets_are_checked(sizes, fits):
    """The kernels' 32-bit offsets (cupy_backend.offsets_fit): a group's m channel planes span
    at most MAX_OFFSET positions, a packed block's 8 images too; local_relation_cupy refuses the
    rest with the reason, before it touches the tensors (meta tensors here)."""
    shape = shape_of(*sizes)
    ok, reason = cb.offsets_fit(shape)
    assert ok == fits
    if fits:
        return
    assert "32-bit" in reason and "reference" in reason
    B, C, H, W, G, K, _ = sizes
    x = torch.empty(B, C, H, W, device="meta")
    q = torch.empty(B, G, shape.out_height, shape.out_width, device="meta")
    k = torch.empty(B, G, H, W, device="meta")
    geo = torch.empty(G, K, K, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        cb.local_relation_cupy(x, q, k, geo, shape, "sqdiff")
