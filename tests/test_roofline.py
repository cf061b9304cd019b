"""benchmarks/roofline.py's accounting of the warps of a tile (no GPU, no compilation): the
warps wholly below the image skip the window loops and run the rest of the tile's code."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
from helpers import REPO

from robustlr.ops import nvrtc


def load_roofline():
    spec = importlib.util.spec_from_file_location("roofline", REPO / "benchmarks" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("height", "live", "below"),
    [
        (14, 2, 2),  # a 14 x 14 stage: one 16 x 32 tile, its two lower warps below the image
        (32, 4, 0),  # one whole tile
        (56, 7, 1),  # two tiles, the second's last warp below the image
    ],
)
def test_warps_below_the_image_run_all_but_the_window_loops(height, live, below):
    roofline = load_roofline()
    channels = 400
    counts = Counter({"FFMA": 300.0, "LDS": 40.0, "MUFU": 20.0})
    skipped = Counter({"FFMA": 280.0, "LDS": 30.0, "MUFU": 20.0})  # the window loops
    usage = nvrtc.PtxasUsage(
        registers=128, stack_frame=0, spill_stores=0, spill_loads=0, shared=40000
    )
    assert roofline.strip_of("lr_forward", roofline.CURRENT) == 4  # 16 x 32 tiles
    _, _, _, times = roofline.predict(
        "lr_forward", roofline.CURRENT, counts, skipped, usage, 8, channels, height
    )
    planes = roofline.B * channels // roofline.M
    per_second = roofline.SMS * roofline.CLOCK / 1e6
    # per tile column: `live` warps run everything, `below` run the 20 FFMA and 10 LDS outside
    # the window loops
    tile_columns = -(-height // roofline.TILE_W)
    warps = planes * tile_columns
    issue = warps * (live * 360 + below * 30) / (roofline.ISSUE_PER_CLOCK * per_second)
    shared = warps * (live * 40 + below * 10) / (roofline.SHARED_PER_CLOCK * per_second)
    mufu = warps * live * 20 / (roofline.MUFU_PER_CLOCK * per_second)
    assert times["issue"] == pytest.approx(issue)
    assert times["smem"] == pytest.approx(shared)
    assert times["MUFU"] == pytest.approx(mufu)


@pytest.mark.parametrize(
    ("kernel", "batch"), [("lr_forward_pairs", 32), ("lr_backward_input_pairs", 31)]
)
def test_pairs_kernels_run_two_live_warps_per_image(kernel, batch):
    """At stage 3 (14 x 14) the pairs kernels hold two images per block, two warps each, all
    running the window loops; with an odd batch the last block's second slot holds no image and
    its two warps run the rest of the tile's code."""
    roofline = load_roofline()
    channels, height = 400, 14
    counts = Counter({"FFMA": 300.0, "LDS": 40.0})
    skipped = Counter({"FFMA": 280.0, "LDS": 30.0})
    usage = nvrtc.PtxasUsage(registers=128, stack_frame=0, spill_stores=0, spill_loads=0, shared=0)
    roofline.B = batch  # (the module's batch, this test's own copy of the module)
    assert roofline.runs_as(roofline.KERNELS[0 if "forward" in kernel else 2], roofline.CURRENT,
                            channels, height) == kernel  # fmt: skip
    _, _, _, times = roofline.predict(
        kernel, roofline.CURRENT, counts, skipped, usage, 8, channels, height
    )
    groups = channels // roofline.M
    live, below = 2 * batch, 2 * (batch % 2)
    per_second = roofline.SMS * roofline.CLOCK / 1e6
    issue = groups * (live * 340 + below * 30) / (roofline.ISSUE_PER_CLOCK * per_second)
    assert times["issue"] == pytest.approx(issue)


@pytest.mark.parametrize(
    ("height", "batch", "dead"),
    [
        (14, 32, 1),  # stage 3: the second pass's last warp (rows 14-15) below both images
        (14, 31, 1),  # the last block's second slot empty: its lanes store nothing
        (16, 32, 0),  # whole tiles
        (11, 32, 2),  # rows 12-15: two warps of the second pass below
    ],
)
def test_query_pairs_skip_the_window_loop_of_a_pass_below_the_images(height, batch, dead):
    """lr_backward_query_pairs holds two images per block in two passes of four thread rows (a
    warp: one thread row of each slot); a warp whose thread row lies below the images in a
    pass skips that pass's window loop (half the skipped counts: one of the two) and runs the
    rest of the tile."""
    roofline = load_roofline()
    channels = 400
    counts = Counter({"FFMA": 600.0, "LDS": 80.0, "MUFU": 40.0})
    skipped = Counter({"FFMA": 560.0, "LDS": 60.0, "MUFU": 40.0})  # both passes' window loops
    usage = nvrtc.PtxasUsage(registers=120, stack_frame=0, spill_stores=0, spill_loads=0, shared=0)
    roofline.B = batch  # (this test's own copy of the module)
    kernel = "lr_backward_query_pairs"
    assert roofline.runs_as("lr_backward_query", roofline.CURRENT, channels, height) == kernel
    _, _, _, times = roofline.predict(
        kernel, roofline.CURRENT, counts, skipped, usage, 8, channels, height
    )
    tiles = channels // roofline.M * -(-batch // 2)
    per_second = roofline.SMS * roofline.CLOCK / 1e6
    issue = tiles * (4 * 720 - dead * 330) / (roofline.ISSUE_PER_CLOCK * per_second)
    shared = tiles * (4 * 80 - dead * 30) / (roofline.SHARED_PER_CLOCK * per_second)
    assert times["issue"] == pytest.approx(issue)
    assert times["smem"] == pytest.approx(shared)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["lr_forward", "lr_backward_input"])
def test_warps_below_the_image_skip_the_window_loops_and_the_gather(kernel):
    """per_thread's skipped counts, from the kernel's sm_90 SASS: what is left for a warp below
    the image has no exp (the window loops) and no global load (the backward input's grad-k
    gather; the tile loaders copy by LDGSTS)."""
    roofline = load_roofline()
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip("nvdisasm is not available (PATH or the triton package)")
    source = roofline.version_source(roofline.CURRENT)
    text = nvrtc.sass(roofline.compile_version(kernel, source), nvdisasm)
    counts, roles, skipped, _ = roofline.per_thread(kernel, roofline.CURRENT, text, 8)
    rest = counts - skipped
    assert counts["MUFU"] > 0 and rest["MUFU"] == 0
    assert rest["LDGSTS"] > 0 and rest["LDG"] == 0
    assert ("gather" in roles.values()) == (kernel == "lr_backward_input")


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["lr_backward_query", "lr_backward_input"])
def test_all_code_counts_each_copy_once(kernel):
    """With all code (the loops and the code around them), a thread's tile costs one
    asynchronous copy per element it stages: its share of the tile's positions, once for each
    single plane (k; q and lse) and each of the M channels. (Until roofline v16 the single
    planes' copies were counted twice: in the tile code and at the loader loops' cost.)"""
    roofline = load_roofline()
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip("nvdisasm is not available (PATH or the triton package)")
    version = roofline.CURRENT
    source = roofline.version_source(version)
    text = nvrtc.sass(roofline.compile_version(kernel, source), nvdisasm)
    counts, roles, _, single = roofline.per_thread(kernel, version, text, 8)
    per_tile, _ = roofline.straight_line(kernel, version, text, roles, 8)
    rows, cols, staged = roofline.staged_tile(kernel, version)
    positions = -(-rows * cols // roofline.THREADS)  # a thread's share of the tile
    total = roofline.all_code_counts(counts, single, per_tile)
    assert staged == (2 if kernel == "lr_backward_input" else 1)
    assert total["LDGSTS"] == (staged + roofline.M) * positions


def test_single_planes_must_lie_in_the_tile_code():
    """The all-code rows leave the single planes' loader-loop share out only where their copies
    are in the tile code: one asynchronous copy per element of k (4 per thread of a backward
    query tile of 22 x 22 at K = 7) in the straight line, else the model refuses."""
    roofline = load_roofline()
    kernel, version = "lr_backward_query", roofline.CURRENT
    assert roofline.staged_tile(kernel, version) == (22, 22, 1)
    roofline.single_planes(kernel, version, Counter({"LDGSTS": 4.0, "IMAD": 50.0}), 8)
    for copies in (0.0, 8.0):
        with pytest.raises(ValueError, match="single planes"):
            roofline.single_planes(kernel, version, Counter({"LDGSTS": copies}), 8)
