"""Static roofline PREDICTIONS for the CUDA kernels on an H100 SXM (no GPU used).

For each LR-Net-26 stage shape (batch 32, K = 7, m = 8, stride 1, fp32, the default sqdiff
composability) and kernel, the model derives a time from four resources, each counted from the
compiled kernels, not from assumed factors:

- issue slots, MUFU (exp) and shared-memory wavefronts: dynamic counts per thread from the sm_90
  SASS of the kernels' own loops (``sass_loops``). Each innermost loop is split into the part
  every iteration runs and the window-pair blocks (the regions a forward branch skips, holding
  one MUFU.EX2 or FMNMX); a window loop runs NT iterations per window column and one pair block
  per (strip position, window offset) pair, the column loops K (or NC) times, the tile loaders
  their element slots (per plane of a tile, over the planes staged side by side). Per position
  = per thread / strip height. Rates per SM and clock: 4 warp instructions issued, 0.5 MUFU
  warp instructions (16 lanes), 1 shared-memory wavefront (a window read is the fewest its
  width allows, ``robustlr.ops.bank_model``: 1 for a 4-byte load or store, 2 for LDS.64, 4 for
  LDS.128);
- DRAM: bytes moved (low: every tensor once, halos hit in L2; high: every halo from DRAM), at
  the lower of the peak bandwidth and what the loads in flight sustain (Little's law: resident
  warps x loads in flight per warp x 128 B per DRAM latency); resident warps from ptxas's
  registers and shared memory (``nvrtc.occupancy``), loads in flight from the tile loader
  (LR_LOAD_BATCH, checked in the SASS by tests/test_kernels_budget.py).

Predicted range per kernel: [the largest of the four times (resident blocks overlap their load
and compute phases), DRAM time with the high bytes + the largest on-chip time (no overlap)].
H100 SXM: 132 SMs at 1.98 GHz, DRAM 3.35 TB/s, DRAM latency 600 ns (a parameter: published
microbenchmarks give 480-700 ns). Versions: v3 to v12 are issue 19's earlier kernels, compiled
from git (COMMITS) by the same method; CURRENT is the working tree. For ALL_CODE versions the
rows "all" add the code outside the counted loops along its longest path (``straight_line``,
``robustlr.ops.sass.loop_tree``); the loader of PLANES_PER_POSITION versions copies every plane
of a position in one thread (its element slots per plane: the positions' trips), and from v11
on it is counted by its loops that run at m = 8 (``whole_group_loops``: not the ragged-group
loop). From v5 on,
the forward's sqdiff path is counted without its pass 1 (the fallback of a strip whose weights
underflow from the bound), and from v6 on without the variant of pass 2 that tests every
neighbour (it runs only where a prior logit is NaN). From
v6 on the fp32 copies hold no register, so a thread keeps a whole tile's copies in flight: its
DRAM bandwidth is the peak. From v7 on the backward query writes one grad-k partial per staged
position of each tile and the backward input reads them (instead of x and D); the backward
query's tile-end sum of its key-gradient copies and the backward input's grad-k gather are
counted from their SASS loops. From v5 on, the two guarded phases of the backward query's
per-column grad-geo reduction (K * 8 and K threads) are counted for the warps that hold those
threads (2 and 1 of 4 at K = 7), not for every warp. In every version the backward query's
delta loop (D = sum_c gy_c y_c per output, from global memory) is counted from its SASS loops.
Every warp of a tile is counted (roofline v15): a warp wholly below the image (or past the last
image of a packed tile) skips the window loops and the backward input's grad-k gather (v5 on;
v4's forward and backward input) and runs the rest of the tile's code, its share of the tile
loaders included; up to roofline v14 such a warp was counted as running nothing. The single
planes a tile stages besides its channels (k; q and lse in the backward input) are copied in the
tile code, not in a loop: the rows "all" count those copies there, once (roofline v16, checked
against the straight line's copies by ``single_planes``); until roofline v15 they were also
counted at the loader loops' cost per element, twice.

    python benchmarks/roofline.py            # compiles the kernels with NVRTC (~1 min)
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

from robustlr.ops import cupy_backend, nvrtc
from robustlr.ops.contract import LocalRelationShape
from robustlr.ops.sass import Loop, LoopNode, loop_tree, sass_loops

SMS, CLOCK, DRAM, LATENCY = 132, 1.98e9, 3.35e12, 600e-9
ISSUE_PER_CLOCK, MUFU_PER_CLOCK, SHARED_PER_CLOCK, WARP_LOAD_BYTES = 4, 0.5, 1, 128
TILE_W, TILE_H = cupy_backend.TILE
THREADS = TILE_W * TILE_H
SHAPES = [(100, 56), (200, 28), (400, 14), (800, 7)]  # res2..res5 (C, H = W), stride 1
B, K, M, S, F = 32, 7, 8, 1, 4  # batch, window, channels per group, stride, bytes per value
#: Shared-memory wavefronts of one conflict-free warp request per opcode (a vector access of
#: 2 or 4 words per lane takes 2 or 4).
SHARED_OPS = {"LDS": 1, "STS": 1, "LDS.64": 2, "STS.64": 2, "LDS.128": 4, "STS.128": 4}


#: Earlier kernels, compiled from git for the same-method comparison (issue 19's steps); the
#: working tree is CURRENT.
COMMITS = {
    "v3": "07f7f62",
    "v4": "c4bdd63",
    "v5": "6e01099",
    "v6": "4978dae",
    "v7": "97f0573",
    "v8": "244ec97",
    "v9": "889441c",
    "v10": "542af4a",
    "v11": "044b968",
    "v12": "13e07b7",
    "v13": "19bc01a",
    "v14": "0f9f003",
    "v15": "e0750ae",
    "v16": "c5af93c",
}
CURRENT = "v17"


def since(first: str) -> tuple[str, ...]:
    """The versions from ``first`` to CURRENT."""
    versions = (*COMMITS, CURRENT)
    return versions[versions.index(first) :]


#: Positions per thread (forward, backward query, backward input) of the earlier kernels at
#: K = 7, stride 1.
STRIPS = {
    "v3": (1, 1, 1),
    "v4": (4, 4, 2),
    "v5": (2, 2, 2),
    "v6": (4, 2, 2),
    "v7": (4, 2, 4),
    "v8": (4, 2, 4),
}
#: Versions whose sqdiff forward starts pass 2 from the bound on the logits (no pass 1).
BOUNDED_FORWARD = since("v5")
#: Versions whose fp32 tile loader is cp.async (loads in flight not limited by registers).
ASYNC_COPIES = since("v6")
#: Versions whose sqdiff window loops leave a neighbour outside the image out by its staged key
#: (LR_FAR_KEY), not by a test.
MASK_BY_KEY = since("v6")
#: Versions whose backward query reduces grad geo once per window column inside its column loop,
#: in guarded blocks that only some warps run (counted for those warps).
REDUCE_BY_THREADS = since("v5")
#: Versions whose backward query forms grad k (partials per tile; the backward input stages q
#: and lse, not D, and reads no x).
KEY_GRAD_IN_QUERY = since("v7")
#: Versions whose channel tiles hold their staged channels side by side at each position, read
#: by vector loads (cupy_backend.vector_width).
VECTOR_CHANNELS = since("v8")
#: Versions whose forward and backward input run lr_forward_packed and
#: lr_backward_input_packed where the images fit their slots (cupy_backend.forward_packed,
#: input_packed: 8 images of a group per block).
PACKED = since("v9")
#: Versions whose loader copies every plane of a position in one thread (its geometry worked out
#: once per position); before, with the channels side by side (VECTOR_CHANNELS), a thread copied
#: one plane of each group (its geometry once per element of each group).
PLANES_PER_POSITION = since("v11")
#: Versions whose forward reads its staged channels side by side at strips of 4 too (before,
#: one at a time there; cupy_backend.vector_width gives the current rule).
FORWARD_QUADS = since("v11")
#: Versions whose loader is counted by its loops that run at m = 8 (whole_group_loops: the
#: loaders of PLANES_PER_POSITION versions copy a ragged group in a loop of its own); until
#: roofline v12 every loader loop was averaged in, v11's ragged-group loop included.
WHOLE_GROUPS_ONLY = since("v11")
#: Versions whose code outside the counted loops is counted too (straight_line, rows "all": its
#: loop roles model their structure, not the earlier versions').
ALL_CODE = since("v10")
#: Versions whose forward and backward input run lr_forward_pairs and lr_backward_input_pairs
#: where the outputs (inputs) fit half a tile's rows (cupy_backend.forward_pairs, input_pairs: 2
#: images of a group per block).
PAIRS = since("v15")
#: Versions whose backward query runs lr_backward_query_pairs where the outputs fit one tile at
#: stride 1 (cupy_backend.query_pairs: 2 images of a group per block, in two passes).
QUERY_PAIRS = since("v17")
#: The kernels of every version, by role; lr_forward_packed stands in for lr_forward where it
#: runs.
KERNELS = ("lr_forward", "lr_backward_query", "lr_backward_input")
#: The kernels with lr_backward_input's window loops (one strip of inputs per thread).
INPUT_KERNELS = ("lr_backward_input", "lr_backward_input_pairs", "lr_backward_input_packed")
#: The kernels with lr_backward_query's loops.
QUERY_KERNELS = ("lr_backward_query", "lr_backward_query_pairs", "lr_backward_query_packed")


def git_file(version: str, name: str) -> str | None:
    """kernels/NAME at the commit of an earlier version; None without git or the commit."""
    done = subprocess.run(["git", "show", f"{COMMITS[version]}:kernels/{name}"],
                          capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)  # fmt: skip
    return done.stdout if done.returncode == 0 else None


def version_source(version: str) -> str | None:
    """kernels/local_relation.cu of a version with its header inlined and the composability
    fixed to sqdiff; None where git or the commit is missing."""
    if version == CURRENT:
        source = nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE)
    else:
        common, kernels = git_file(version, "lr_common.cuh"), git_file(version, "local_relation.cu")
        if common is None or kernels is None:
            return None
        source = kernels.replace('#include "lr_common.cuh"', common.replace("#pragma once", ""))
    if version == "v3":  # a runtime composability argument in the window loops
        for fn in ("lr_phi", "lr_dphi_dq", "lr_dphi_dk"):
            source = source.replace(f"{fn}(comp,", f"{fn}(LR_SQDIFF,")
        return source
    dispatch = re.search(r"#define LR_BY_COMPOSABILITY\(comp, FN, \.\.\.\)(?:.*\\\n)+.*\n", source)
    return source.replace(
        dispatch.group(0),
        "#define LR_BY_COMPOSABILITY(comp, FN, ...) FN<T, K, STRIDE, LR_SQDIFF>(__VA_ARGS__);\n",
    )


def load_batch(source: str) -> int:
    """LR_LOAD_BATCH of a version's source: the global loads a loader thread keeps in flight."""
    return int(re.search(r"#define LR_LOAD_BATCH (\d+)", source).group(1))


def compile_version(kernel: str, source: str) -> nvrtc.CompiledProgram:
    """sm_90 build of one kernel (K, S, fp32, sqdiff only) with ptxas's report."""
    name = nvrtc.name_expression(kernel, "float", K, S)
    return nvrtc.compile_source(source, [name], "sm_90", (*nvrtc.GPU_OPTIONS, "-Xptxas=-v"))


# ---- per-thread dynamic counts ------------------------------------------------------------------


def loader_slots(rows: int, cols: int, batch: int, width: int = 1) -> float:
    """Element slots a loader thread runs per plane of one ROWS x COLS tile whose planes are
    staged in groups of ``width`` side by side (a thread copies one plane of each group): the
    group's trips, in batches of up to ``batch`` (a partial last batch runs whole), over the
    ``width`` planes of the group."""
    trips = -(-rows * cols * width // THREADS)
    step = min(trips, batch)
    return -(-trips // step) * step / width


def loader_width(kernel: str, version: str) -> int:
    """Planes of a group that share a loader thread's positions (it copies one of them): the
    vector width where the channels lie side by side, 1 where a thread copies every plane."""
    forward = kernel in ("lr_forward", "lr_forward_pairs", "lr_forward_packed")
    if forward and strip_of(kernel, version) == 4 and version not in FORWARD_QUADS:
        return 1  # one channel at a time at strips of 4 before v11
    if version in VECTOR_CHANNELS and version not in PLANES_PER_POSITION:
        return cupy_backend.vector_width(kernel, K, S)
    return 1


def loader_slots_per_iteration(loop: Loop) -> int:
    """Element slots of one iteration of a tile-loader loop: its asynchronous copies, or (the
    register path) its shared stores."""
    return loop.every["LDGSTS"] or loop.every["STS"]


def whole_group_loops(kernel: str, loaders: list[Loop]) -> list[Loop]:
    """The tile-loader loops that run at m = 8: lr_load_planes copies in two loops, the groups
    whose planes are all copied, then the rest (the planes of a ragged group, a chunk short of MC
    channels), which m = MC = 8 never runs. In address order the first of each pair; the second
    holds the ragged plane's test, so it runs more integer compares (ISETP; checked). (Until
    roofline v13 the check was on all instructions: a v13 draft's lr_forward_packed, compiled
    with lr_tile_of, had a whole-group loop 2 instructions longer than its ragged one, which
    tests more.)"""
    ordered = sorted(loaders, key=lambda lp: lp.first)
    if len(ordered) % 2:
        raise ValueError(f"{kernel}: {len(ordered)} loader loops, not pairs")
    pairs = list(zip(ordered[::2], ordered[1::2], strict=True))
    for whole, rest in pairs:
        if rest.every["ISETP"] <= whole.every["ISETP"]:
            raise ValueError(
                f"{kernel}: loader loop {rest.first:#x} tests no more than {whole.first:#x}"
            )
    return [whole for whole, _ in pairs]


def global_loops(loops: list[Loop], others: list[Loop], least: dict[str, int]) -> list[Loop]:
    """The loops not in ``others`` that touch no shared memory and store nothing to global memory,
    whose every iteration runs at least ``least[op]`` of each op."""
    return [
        lp
        for lp in loops
        if lp not in others
        and all(lp.every[op] >= n for op, n in least.items())
        and not (lp.every["LDS"] or lp.every["STS"] or lp.every["STG"])
    ]


def strip_of(kernel: str, version: str) -> int:
    if version in STRIPS:
        return STRIPS[version][KERNELS.index(kernel)]
    return cupy_backend.strip(kernel, K, S)


def positions_of(kernel: str, version: str) -> int:
    """Positions a thread owns per tile: its strip, over the passes of lr_backward_query_pairs
    (two: a strip of each)."""
    passes = cupy_backend.QUERY_PAIR_PASSES if kernel == "lr_backward_query_pairs" else 1
    return strip_of(kernel, version) * passes


def kernels_of(version: str) -> tuple[str, ...]:
    """The kernels a version has (the packed ones in PACKED versions, lr_forward_pairs in PAIRS
    versions)."""
    if version not in PACKED:
        return KERNELS
    packed = [
        k
        for k in cupy_backend.PACKED_KERNELS
        if (k not in cupy_backend.PAIR_KERNELS or version in PAIRS)
        and (k != "lr_backward_query_pairs" or version in QUERY_PAIRS)
    ]
    return (*KERNELS, *packed)


def packed_bytes(kernel: str) -> int:
    """Dynamic shared memory of a kernel's launch (the packed kernels'), else 0."""
    return cupy_backend.dynamic_shared_bytes(kernel, K, S)


def stage_shape(C: int, H: int) -> LocalRelationShape:
    """The op's shape at one LR-Net-26 stage (batch B, K, m, stride S)."""
    Ho = (H - 1) // S + 1
    return LocalRelationShape(B, C, H, H, C // M, M, Ho, Ho, K, S, 1)


def runs_as(kernel: str, version: str, C: int, H: int) -> str:
    """The kernel that does ``kernel``'s work at one stage: in PACKED versions the packed
    kernels for the forward and backward input of small images (cupy_backend.forward_packed,
    input_packed), in PAIRS versions lr_forward_pairs and lr_backward_input_pairs for images of at
    most half a tile's rows (cupy_backend.forward_pairs, input_pairs), in QUERY_PAIRS versions
    lr_backward_query_pairs for images of at most one tile at stride 1 (query_pairs)."""
    shape = stage_shape(C, H)
    if version in PACKED and kernel == "lr_forward" and cupy_backend.forward_packed(shape):
        return "lr_forward_packed"
    if version in PAIRS and kernel == "lr_forward" and cupy_backend.forward_pairs(shape):
        return "lr_forward_pairs"
    if version in PACKED and kernel == "lr_backward_input" and cupy_backend.input_packed(shape):
        return "lr_backward_input_packed"
    if version in PAIRS and kernel == "lr_backward_input" and cupy_backend.input_pairs(shape):
        return "lr_backward_input_pairs"
    if version in PACKED and kernel == "lr_backward_query" and cupy_backend.query_packed(shape):
        return "lr_backward_query_packed"
    if version in QUERY_PAIRS and kernel == "lr_backward_query" and cupy_backend.query_pairs(shape):
        return "lr_backward_query_pairs"
    return kernel


def gather_rows() -> float:
    """Backward-query tile rows that staged one input, on average: IH / (OTH * S)."""
    rows = TILE_H * cupy_backend.query_strip(K, S)
    return ((rows - 1) * S + K) / (rows * S)


def staged_tile(kernel: str, version: str) -> tuple[int, int, int]:
    """(rows, columns, planes besides the M channels) a kernel's tile loaders copy per tile (a
    packed kernel's: the image boxes of its slots, stacked)."""
    R, nc = strip_of(kernel, version), (K - 1) // S + 1
    if kernel in cupy_backend.PACKED_KERNELS:
        # the image box of each slot (the rest filled once; the backward query's tile end over
        # the same box): q and lse in the backward input, k otherwise
        packed = cupy_backend.packed_geometry(kernel, K, S)
        rows = cupy_backend.images_per_block(kernel) * packed.box_rows
        return rows, packed.box_cols, 2 if kernel in INPUT_KERNELS else 1
    if kernel == "lr_backward_input":
        staged = 2 if version in KEY_GRAD_IN_QUERY else 3  # q, lse (, D)
        rows, cols = (TILE_H * R + S - 2) // S + nc, (TILE_W + S - 2) // S + nc
    else:
        rows, cols, staged = (TILE_H * R - 1) * S + K, (TILE_W - 1) * S + K, 1  # k
    return rows, cols, staged


def per_thread(
    kernel: str, version: str, text: str, batch: int
) -> tuple[Counter, dict[int, str], Counter, Counter]:
    """Dynamic instruction counts of one thread over one tile (one chunk of m = 8 channels) in
    the kernel's innermost loops, the role of each loop it accounts for, by its first address
    ("window", "loader", "gather", "delta", "tile end"; the window-loop variants counted as
    never run are "window" too), the part of the counts that a warp wholly below the image
    skips (its window loops, and the backward input's grad-k gather, run per input in the
    image), and the part that stands for the single planes' copies (k; q and lse in the
    backward input: ``single_planes``).

    v3: one window-loop iteration per window row (K, NC), its pairs unrolled. Later versions: a
    window loop whose pairs are branched blocks (rolled strip rows) runs NT iterations per
    window column (K columns, NC for backward input) and each pair block on the K rows where it
    exists; with the strip rows unrolled, as many iterations as the window pairs take. The tile
    loader: the loops with global loads and shared stores that test bounds (ISETP beyond their
    own loop test), one per batch and plane; the geo copy loops, which the compiler unrolls 16-
    and 4-fold in v3 and v4, test only their counter. Interior positions: every pair runs."""
    loops = sass_loops(text)
    window = [lp for lp in loops if lp.pairs or lp.every["MUFU"] or lp.every["FMNMX"]]
    roles = {lp.first: "window" for lp in window}
    forward = kernel in ("lr_forward", "lr_forward_pairs", "lr_forward_packed")
    if forward and version in BOUNDED_FORWARD:
        # sqdiff starts pass 2 from the bound on the logits: pass 1 (the loop of FMNMX without
        # exp) runs only where a strip's weight sum falls below LR_SUM_FLOOR, counted as never
        exact = [lp for lp in window if not (lp.pairs or lp.every["MUFU"])]
        if len(exact) > 1:  # another loop of FMNMX (the bound's, say) taken for pass 1
            raise ValueError(f"{kernel} {version}: {len(exact)} loops of FMNMX without exp")
        window = [lp for lp in window if lp.pairs or lp.every["MUFU"]]
    if forward and version in MASK_BY_KEY:
        # pass 2's variant that tests every neighbour (FSEL) runs only where a prior logit is
        # NaN (or for mul): counted as never
        window = [lp for lp in window if not lp.every["FSEL"]]
    loaders = [
        lp
        for lp in loops
        # (copies; or loads and stores with tests past the loop's own, the register path)
        if (lp.every["LDGSTS"] or (lp.every["STS"] and lp.every["LDG"] and lp.every["ISETP"] > 1))
        and lp not in window
    ]
    roles.update({lp.first: "loader" for lp in loaders})
    # ops per element slot, averaged over the loader loops that run at m = 8
    running = whole_group_loops(kernel, loaders) if version in WHOLE_GROUPS_ONLY else loaders
    loader = Counter()
    for lp in running:
        loader.update({op: n / loader_slots_per_iteration(lp) for op, n in lp.every.items()})
    loader = Counter({op: n / len(running) for op, n in loader.items()})
    width = loader_width(kernel, version)
    R, nc = strip_of(kernel, version), (K - 1) // S + 1
    total, skipped = Counter(), Counter()
    for body in window:
        pairs = sum(body.pairs, Counter())
        if version == "v3":  # one iteration per window row, its K (NC) pairs unrolled
            runs = {op: nc * (body.every[op] + pairs[op]) for op in body.every | pairs}
        elif body.pairs:  # rolled strip-row loops: NT iterations per window column
            if kernel in INPUT_KERNELS:
                iterations, column_pairs = nc * ((R + S - 2) // S + nc), nc * K
            else:
                iterations, column_pairs = K * ((R - 1) * S + K), K * K
            runs = {
                op: iterations * body.every[op] + column_pairs * pairs[op]
                for op in body.every | pairs
            }
        else:  # strip rows unrolled: as many iterations as the window pairs take
            per_iteration = body.every["MUFU"] or body.every["FMNMX"]
            window_pairs = (nc if kernel in INPUT_KERNELS else K) * K * R
            iterations = window_pairs / per_iteration
            every = body.every.copy()
            if kernel in QUERY_KERNELS and version in REDUCE_BY_THREADS:
                # the grad-geo reduction of each window column: its first phase (the larger
                # guarded block without exp) runs on the warps holding the K * 8 summing threads,
                # its second on those holding the K offset threads, not on every warp
                reduce = sorted((g for g in body.guarded if not g["MUFU"]), key=lambda g: g["LDS"])
                warps = THREADS // 32
                for block, threads in zip(reduce[-2:], (K, K * 8), strict=True):
                    share = -(-threads // 32) / warps
                    every.subtract({op: (1 - share) * n for op, n in block.items()})
            runs = {op: iterations * n for op, n in every.items()}
        total.update(runs)
        skipped.update(runs)
    rows, cols, staged = staged_tile(kernel, version)
    # the single planes at the loader loops' cost per element slot (their copies are not in a
    # loop: ``single_planes``), then the M channel planes
    single = Counter({op: staged * loader_slots(rows, cols, batch) * n for op, n in loader.items()})
    total.update(single)
    total.update({op: M * loader_slots(rows, cols, batch, width) * n for op, n in loader.items()})
    if kernel in INPUT_KERNELS and version in KEY_GRAD_IN_QUERY:
        # the grad-k gather: per strip input a loop over the backward-query tiles that staged it
        # (global loads and adds, nothing stored in the loop), about IH / (OTH * S) tile rows
        # per input (the tile columns unrolled into one iteration)
        trips = gather_rows()
        for lp in global_loops(loops, window + loaders, {"LDG": 1, "FADD": 1}):
            total.update({op: trips * n for op, n in lp.every.items()})
            skipped.update({op: trips * n for op, n in lp.every.items()})
            roles[lp.first] = "gather"
    if kernel in QUERY_KERNELS and version in KEY_GRAD_IN_QUERY:
        # the tile-end sum of the key-gradient copies: per staged position (rows x cols over
        # THREADS per thread) the loop that stores its partial (one STG) and, up to v13, the
        # loop over the copies holding it (one LDS and one STS each; v14 unrolls it into the
        # storing loop), inside the tile loop (not the block's store of its grad-geo partials,
        # after it)
        tiles = next(node for node in loop_tree(text).children if node.children)
        tile_end = [
            lp
            for lp in loops
            if lp not in window
            and lp not in loaders
            and tiles.first <= lp.first <= tiles.last
            and lp.every["LDS"]
            and (lp.every["STG"] == 1 or lp.every["LDS"] == lp.every["STS"])
        ]
        positions = -(-rows * cols // THREADS)
        for lp in tile_end:
            total.update({op: positions * n for op, n in lp.every.items()})
            roles[lp.first] = "tile end"
    if kernel in QUERY_KERNELS:
        # the delta D = sum_c gy_c y_c of each strip output, from global memory (up to v12; v13
        # forms D in its chunk code, counted with all code, and has none): the loops with
        # global loads and FFMAs and no shared access, unrolled by the compiler with remainder
        # loops (channels per trip = their FFMAs): over the m channels greedily, largest first;
        # a loop no smaller than the one before starts the next output's channels
        remaining, previous = 0, 0
        for lp in global_loops(loops, window + loaders, {"LDG": 2, "FFMA": 1}):
            per_trip = lp.every["FFMA"]
            if per_trip >= previous:
                remaining = M
            trips, previous = remaining // per_trip, per_trip
            remaining -= trips * per_trip
            total.update({op: trips * n for op, n in lp.every.items()})
            roles[lp.first] = "delta"
    if kernel == "lr_backward_query" and version == "v4":
        # the fixed-order reduction per window column (outside v4's rolled strip-row loop; inside
        # v3's window loop and v5's column loop): 16 + 8 shared reads and adds by a quarter of
        # the threads, counted for all
        total["LDS"] += K * (16 + 8) / 4
        total["FADD"] += K * (16 + 8) / 4
    return total, roles, skipped, single


def single_planes(kernel: str, version: str, per_tile: Counter, batch: int) -> None:
    """Check that the copies of a kernel's single planes (k; q and lse in the backward input:
    ``staged_tile``) lie in its tile code's straight line, ``per_tile`` (straight_line): one
    asynchronous copy per element slot of each. per_thread counts them at the loader loops'
    cost per slot too, which the rows with all code leave out (roofline v16; until then they
    were counted twice there). Raises ValueError where they do not (a loop of their own, or a
    register-path loader: a new structure to model)."""
    rows, cols, staged = staged_tile(kernel, version)
    want = staged * loader_slots(rows, cols, batch)
    if per_tile["LDGSTS"] != want:
        raise ValueError(
            f"{kernel} {version}: {per_tile['LDGSTS']:g} copies in the tile code, not the "
            f"{want:g} of its single planes"
        )


def all_code_counts(counts: Counter, single: Counter, per_tile: Counter) -> Counter:
    """Per thread and tile, all code: the loops' counts (per_thread) without the part standing
    for the single planes' copies (``single``), and the code outside the loops (``per_tile``,
    straight_line), where those copies lie (``single_planes``)."""
    total = counts.copy()
    total.subtract(single)
    total.update(per_tile)
    return total


def per_block(kernel: str, text: str) -> tuple[Counter, dict[int, str]]:
    """Dynamic instruction counts of one thread over what a block runs once, whatever its tiles:
    the packed kernels' fill of their tiles with what lies outside the images (the loops of
    4-word stores, one STS.128 per iteration); and those loops' role ("fill") by first
    address."""
    total = Counter()
    if kernel not in cupy_backend.PACKED_KERNELS:
        return total, {}
    slot = cupy_backend.packed_geometry(kernel, K, S).slot
    slots = cupy_backend.images_per_block(kernel)
    planes = (1, 1, M) if kernel in INPUT_KERNELS else (1, M)  # s_q, s_lse, s_gy; or s_k, s_x
    fills = [lp for lp in sass_loops(text) if lp.every["STS.128"]]
    for lp, n_planes in zip(fills, planes, strict=True):
        trips = -(-n_planes * slots * slot // (4 * THREADS))
        total.update({op: trips * n for op, n in lp.every.items()})
    return total, {lp.first: "fill" for lp in fills}


def chunks_of(kernel: str) -> int:
    """Channel chunks a tile runs: the M channels of a group, MC at a time."""
    packed = kernel in cupy_backend.PACKED_KERNELS
    chunk = cupy_backend.MAX_CHANNEL_CHUNK if packed else cupy_backend.kernel_tiles(kernel, K, S)[1]
    return -(-M // chunk)


def block_arrays(kernel: str) -> tuple[int, int]:
    """(floats, prior-logit partials) a block zeroes and stores in loops outside its tile loop:
    lr_backward_query's grad-geo accumulator and key-gradient copies zeroed before the tiles, its
    K * K grad-geo partials stored after them; (0, 0) for the other kernels."""
    if kernel == "lr_backward_query":
        R = cupy_backend.query_strip(K, S)
        return K * K + TILE_H * cupy_backend.key_grad_pitch(K, S, R), K * K
    if kernel in ("lr_backward_query_packed", "lr_backward_query_pairs"):
        return K * K + 2 * TILE_H * cupy_backend.packed_geometry(kernel, K, S).copy, K * K
    return 0, 0


def straight_line(
    kernel: str, version: str, text: str, roles: dict[int, str], batch: int
) -> tuple[Counter, Counter]:
    """Dynamic instruction counts of one thread of the code per_thread and per_block do not
    count, (per tile, per block): each loop's own code (its inner loops left out) along its
    longest path (``loop_tree``: the most instructions, no call of the runtime's slow paths),
    times the runs of that loop per tile; and what a block runs before and after its tiles. The
    runs by what a loop holds:

    - the tile loop (the outermost loop holding the window loops) and the loops between it and
      them (the channel chunks, the forward's pass-2 retry): once (one chunk of channels at
      m = 8, chunks_of; the retry, the fallback of a strip whose weights underflow, counted as
      never);
    - a loop around loader loops (more than LR_LOAD_BATCH elements a thread): once per batch of
      the larger of the loaders it may hold (an upper bound);
    - a loop around the backward query's tile-end loop: once per staged position of a thread;
    - a loop around the backward input's grad-k gather: once per backward-query tile row that
      staged an input (the gather loop's own count, per_thread);
    - the loops a block runs before or after its tiles (zeroing its accumulators and copies,
      storing its grad-geo partials): the floats they cover over the threads, at one element per
      store of an iteration, each loop as if it covered the largest such array (an upper bound;
      v14 has no such loops: its stores are unrolled, lr_fill_each, and counted as they run).

    Raises ValueError for a loop of none of these kinds (a new kernel structure to model)."""
    tree = loop_tree(text)
    rows, cols, _ = staged_tile(kernel, version)
    width = loader_width(kernel, version)
    batches = max(
        -(-trips // min(trips, batch))
        for trips in (-(-rows * cols // THREADS), -(-rows * cols * width // THREADS))
    )
    positions = -(-rows * cols // THREADS)
    zeroed, stored = block_arrays(kernel)
    if chunks_of(kernel) != 1:
        raise ValueError(f"{kernel}: more than one chunk of channels per tile")

    def leaf_roles(node: LoopNode) -> set[str]:
        return {roles.get(n.first, "?") for n in node.walk() if not n.children}

    def runs(node: LoopNode, outer: float) -> Counter:
        kinds = {roles.get(child.first) for child in node.children if not child.children}
        if "window" in leaf_roles(node):
            each = 1
        elif kinds == {"loader"}:
            each = batches
        elif "tile end" in kinds:
            each = positions
        elif "gather" in kinds:
            each = gather_rows()
        else:
            raise ValueError(f"{kernel}: no model for the loop at {node.first:#x}")
        total = Counter({op: outer * each * n for op, n in node.path.items()})
        for child in node.children:
            if child.children:
                total.update(runs(child, outer * each))
            elif child.first not in roles:
                raise ValueError(f"{kernel}: no model for the loop at {child.first:#x}")
        return total

    once = Counter(tree.path)
    per_tile = Counter()
    for node in tree.children:
        if node.children:
            per_tile.update(runs(node, 1.0))
        elif node.first not in roles:  # before or after the tiles
            stores = node.ops["STG"] or node.ops["STS"]
            if not stores or not zeroed:
                raise ValueError(f"{kernel}: no model for the loop at {node.first:#x}")
            floats = stored if node.ops["STG"] else zeroed
            once.update({op: -(-floats // (THREADS * stores)) * n for op, n in node.path.items()})
    return per_tile, once


def tiles_per_block(kernel: str, C: int, H: int) -> float:
    """Tiles a block runs at one stage, on average (its grid as planned for SMS
    multiprocessors): the backward query's tiles of a group over its blocks per group
    (query_chunks); 1 for the others (a block per tile)."""
    shape = stage_shape(C, H)
    if kernel in QUERY_KERNELS:  # (the grid as planned for this kernel, whichever runs now)
        per_group = cupy_backend.query_tile_list(shape, kernel)
        return per_group / cupy_backend.query_chunks(shape, SMS, kernel)
    return 1.0


def predict(
    kernel: str,
    version: str,
    counts: Counter,
    skipped: Counter,
    usage: nvrtc.PtxasUsage,
    batch: int,
    C: int,
    H: int,
):
    """(low us, high us, bound, {resource: us}) of one kernel at one stage from the counts per
    thread and tile of a warp that runs the window loops (``counts``) and the part of them that
    a warp wholly below the image skips (``skipped``, per_thread: it runs the rest; in
    lr_backward_query_pairs, whose tile is two passes with a window loop each, a warp skips
    the window loop of each pass in which its thread row lies below the images: half of
    ``skipped``)."""
    strip = strip_of(kernel, version)
    G, NCOV = C // M, (K - 1) // S + 1
    n_in, n_g = B * C * H * H, B * G * H * H
    rows = TILE_H * strip
    tiles_h, tiles_w = -(-H // rows), -(-H // TILE_W)
    # warps that run the window loops: a warp wholly below the image skips them, except in every
    # v3 kernel and v4's backward query
    live_rows = [
        min(H - (th * rows + w * 2 * strip), 2 * strip)
        for th in range(tiles_h)
        for w in range(TILE_H // 2)
    ]
    if version == "v3" or (version == "v4" and kernel == "lr_backward_query"):
        warps_per_plane = tiles_h * (TILE_H // 2) * tiles_w
    else:
        warps_per_plane = sum(r > 0 for r in live_rows) * tiles_w
    warps = B * G * warps_per_plane
    # every warp of a tile (roofline v15; until v14 only those that run the window loops)
    all_warps = B * G * tiles_h * (TILE_H // 2) * tiles_w
    dynamic = packed_bytes(kernel)
    dead_passes, passes = 0, 1  # (lr_backward_query_pairs: the warp-passes below the images)
    if kernel in ("lr_forward_packed", "lr_backward_input_packed"):
        # a warp per two images (its slots), live if the first is; each image staged once
        warps = G * -(-B // 2)
        all_warps = G * -(-B // cupy_backend.SLOTS) * (THREADS // 32)
    elif kernel == "lr_backward_query_pairs":
        # every warp runs the whole tile (all passes) but the window loop of each pass whose
        # thread row (warp w + 4 pass, the same in both slots) lies below the images
        tiles = G * -(-B // cupy_backend.PAIR_SLOTS)
        warps = all_warps = tiles * (THREADS // 32)
        passes = cupy_backend.QUERY_PAIR_PASSES
        rows_of = [(w + p * TILE_H // 2) * strip for w in range(TILE_H // 2) for p in range(passes)]
        dead_passes = tiles * sum(row >= H for row in rows_of)
    elif kernel in cupy_backend.PAIR_KERNELS:
        # two warps per image (a slot each), live if it holds an image; each image staged once
        warps = G * B * (THREADS // 32 // cupy_backend.PAIR_SLOTS)
        all_warps = G * -(-B // cupy_backend.PAIR_SLOTS) * (THREADS // 32)
    elif kernel == "lr_backward_query_packed":
        # tiles of QUERY_SLOTS images: two warps per two images (slots of four thread rows)
        tiles = range(0, B, cupy_backend.QUERY_SLOTS)
        warps = G * sum(2 * -(-min(cupy_backend.QUERY_SLOTS, B - b0) // 2) for b0 in tiles)
        all_warps = G * len(tiles) * (THREADS // 32)
    # the warps below the image (or past the last image) run the tile's code but its window loops
    below = all_warps - warps
    rest = counts - skipped

    def warp_total(op_counts: dict[str, float]) -> float:
        """Warp instructions (or wavefronts) of all the warps, from per-thread counts op: n (a
        pass below the images skips its share of the window loops: lr_backward_query_pairs)."""
        return sum(
            n * (warps * counts[op] + below * rest[op] - dead_passes * skipped[op] / passes)
            for op, n in op_counts.items()
        )

    issue = warp_total(dict.fromkeys(counts, 1)) / (ISSUE_PER_CLOCK * SMS * CLOCK)
    mufu = warp_total({"MUFU": 1}) / (MUFU_PER_CLOCK * SMS * CLOCK)
    shared = warp_total(SHARED_OPS) / (SHARED_PER_CLOCK * SMS * CLOCK)
    ih = (rows - 1) * S + K
    halo = ih * ((TILE_W - 1) * S + K) / (rows * TILE_W)
    oh = (rows + S - 2) // S + NCOV
    halo_out = oh * ((TILE_W + S - 2) // S + NCOV) / (rows * TILE_W)
    if kernel in ("lr_backward_input_packed", "lr_backward_input_pairs"):
        halo_out = 1.0  # each image's outputs staged once
    # grad-k partials: one per staged input position of each backward-query tile; one per input
    # where the packed backward query writes them (the images' positions only)
    n_partial = B * G * cupy_backend.key_partials(K, S, H, H)
    if runs_as("lr_backward_query", version, C, H) in (
        "lr_backward_query_packed",
        "lr_backward_query_pairs",
    ):
        n_partial = B * G * H * H
    if kernel in ("lr_forward_packed", "lr_forward_pairs"):
        # x, q, k in (each image staged once); y, lse out
        low = high = F * (n_in + 3 * n_g + n_in)
    elif kernel == "lr_forward":  # x, q, k in; y, lse out
        low, high = F * (n_in + 3 * n_g + n_in), F * (halo * (n_in + n_g) + 2 * n_g + n_in)
    elif kernel in ("lr_backward_query_packed", "lr_backward_query_pairs"):  # images once
        low = high = F * (3 * n_in + 4 * n_g + n_partial)
    elif kernel == "lr_backward_query" and version in KEY_GRAD_IN_QUERY:
        # x, q, k, lse, y, gy in; gq and the grad-k partials (n_partial) out
        low = F * (3 * n_in + 4 * n_g + n_partial)
        high = F * (halo * (n_in + n_g) + 2 * n_in + 3 * n_g + n_partial)
    elif kernel == "lr_backward_query":  # x, q, k, lse, y, gy in; gq, D out
        low = F * (3 * n_in + 5 * n_g)
        high = F * (halo * (n_in + n_g) + 2 * n_in + 4 * n_g)
    elif version in KEY_GRAD_IN_QUERY:  # q, lse, gy (halo), k, the partials in; gx, gk out
        low = F * (2 * n_in + 4 * n_g + n_partial)
        high = F * (halo_out * (n_in + 2 * n_g) + n_in + 2 * n_g + n_partial)
    else:  # q, lse, D, gy (halo), x, k in; gx, gk out
        low = F * (3 * n_in + 5 * n_g)
        high = F * (halo_out * (n_in + 3 * n_g) + 2 * n_in + 2 * n_g)
    blocks, _ = nvrtc.occupancy(usage, "sm_90", dynamic=dynamic)
    resident = blocks * THREADS // 32
    in_flight = SMS * resident * batch * WARP_LOAD_BYTES / LATENCY
    bandwidth = DRAM if version in ASYNC_COPIES else min(DRAM, in_flight)
    on_chip = {"issue": issue, "MUFU": mufu, "smem": shared}
    times = {"DRAM": low / bandwidth, **on_chip}
    bound = max(times, key=times.get)
    high_time = high / bandwidth + max(on_chip.values())
    return times[bound] * 1e6, high_time * 1e6, bound, {n: t * 1e6 for n, t in times.items()}


def main() -> None:
    sources = {v: version_source(v) for v in (*COMMITS, CURRENT)}
    versions = [v for v, source in sources.items() if source is not None]
    batches = {v: load_batch(sources[v]) for v in versions}
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        raise SystemExit("Error: nvdisasm not found (PATH or the triton package's bin directory)")
    counts, once, rest, usage, skipped, single = {}, {}, {}, {}, {}, {}
    for version in versions:
        for kernel in kernels_of(version):
            prog = compile_version(kernel, sources[version])
            (usage[version, kernel],) = nvrtc.ptxas_usage(prog.log).values()
            text = nvrtc.sass(prog, nvdisasm)
            counts[version, kernel], roles, skipped[version, kernel], single[version, kernel] = (
                per_thread(kernel, version, text, batches[version])
            )
            once[version, kernel], fills = per_block(kernel, text)
            if version in ALL_CODE:  # the code outside the counted loops
                rest[version, kernel] = straight_line(
                    kernel, version, text, roles | fills, batches[version]
                )
                single_planes(kernel, version, rest[version, kernel][0], batches[version])

    def dynamic(kernel: str, version: str, C: int, H: int, all_code: bool) -> Counter:
        """Per thread and tile at one stage: the loops' counts, the once-per-block ones over the
        tiles a block runs, and (all_code) the code outside the counted loops, where the single
        planes' copies lie (not also at the loader loops' cost)."""
        share = 1 / tiles_per_block(kernel, C, H)
        block = once[version, kernel].copy()
        tile = counts[version, kernel].copy()
        if all_code:
            tile = all_code_counts(tile, single[version, kernel], rest[version, kernel][0])
            block.update(rest[version, kernel][1])
        return tile + Counter({op: n * share for op, n in block.items()})

    print("Per position (per thread / its positions a tile; the tiled kernels at stage 1, the")
    print("packed ones at stage 4, the pairs at stage 3, where they run), K = 7, stride 1, m = 8,")
    print("sqdiff,")
    print("sm_90 SASS; all code:")
    print(f"{', '.join(ALL_CODE)} only (the loops alone for the earlier versions):\n")
    print("| kernel | version | strip | registers | warps/SM | instructions (loops) "
          "| instructions (all code) | MUFU | shared wavefronts |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for kernel in nvrtc.KERNEL_NAMES:
        C1, H1 = SHAPES[-1] if kernel in cupy_backend.PACKED_KERNELS else SHAPES[0]
        if kernel in cupy_backend.PAIR_KERNELS:
            C1, H1 = SHAPES[2]
        for version in (v for v in versions if kernel in kernels_of(v)):
            c, u = dynamic(kernel, version, C1, H1, False), usage[version, kernel]
            strip, per = strip_of(kernel, version), positions_of(kernel, version)
            blocks, _ = nvrtc.occupancy(u, "sm_90", dynamic=packed_bytes(kernel))
            all_code = "-"
            if version in ALL_CODE:
                c = dynamic(kernel, version, C1, H1, True)
                all_code = f"{c.total() / per:.0f}"
                loops = dynamic(kernel, version, C1, H1, False).total() / per
            else:
                loops = c.total() / per
            print(f"| {kernel} | {version} | {strip} | {u.registers} | {blocks * THREADS // 32} "
                  f"| {loops:.0f} | {all_code} | {c['MUFU'] / per:.0f} "
                  f"| {sum(c[o] * n for o, n in SHARED_OPS.items()) / per:.0f} |")  # fmt: skip
    print()
    print("| stage (CxHxW) | kernel | version | code | bound by | predicted us "
          "| issue us | smem us | MUFU us | DRAM us |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals: dict[tuple[int, int, str, bool], list[tuple[str, float, float]]] = {}
    for C, H in SHAPES:
        for role in KERNELS:
            for version in versions:
                kernel = runs_as(role, version, C, H)
                for all_code in (False, True) if version in ALL_CODE else (False,):
                    c = dynamic(kernel, version, C, H, all_code)
                    u = usage[version, kernel]
                    low, high, bound, t = predict(
                        kernel, version, c, skipped[version, kernel], u, batches[version], C, H
                    )
                    direction = "forward" if role == "lr_forward" else "backward"
                    totals.setdefault((C, H, version, all_code), []).append((direction, low, high))
                    code = "all" if all_code else "loops"
                    print(f"| {C}x{H}x{H} | {kernel} | {version} | {code} | {bound} "
                          f"| {low:.0f}-{high:.0f} | {t['issue']:.0f} | {t['smem']:.0f} "
                          f"| {t['MUFU']:.0f} | {t['DRAM']:.0f} |")  # fmt: skip
    print()
    print("| stage | version | code | forward floor us | forward predicted us | x floor "
          "| backward floor us | backward predicted us | x floor |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for C, H in SHAPES:
        G = C // M
        n_in, n_g = B * C * H * H, B * G * H * H
        floor_f = F * (2 * n_in + 2 * n_g) / DRAM * 1e6
        floor_b = F * (3 * n_in + 5 * n_g) / DRAM * 1e6
        for version, all_code in ((v, a) for v in versions for a in (False, True)):
            if (C, H, version, all_code) not in totals:
                continue
            got = totals[(C, H, version, all_code)]
            f = [sum(r[i] for r in got if r[0] == "forward") for i in (1, 2)]
            b = [sum(r[i] for r in got if r[0] == "backward") for i in (1, 2)]
            print(f"| {C}x{H}x{H} | {version} | {'all' if all_code else 'loops'} "
                  f"| {floor_f:.0f} | {f[0]:.0f}-{f[1]:.0f} "
                  f"| {f[0] / floor_f:.2f}-{f[1] / floor_f:.2f} "
                  f"| {floor_b:.0f} | {b[0]:.0f}-{b[1]:.0f} | {b[0] / floor_b:.2f}-"
                  f"{b[1] / floor_b:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
