"""The register budget of the GPU kernels, from ptxas itself (NVRTC with -Xptxas=-v, no GPU).

Every instantiation with K in {3, 5, 7}, stride in {1, 2}, fp32 / fp16 / bf16, on sm_80 and
sm_90 must keep its per-thread state in registers (0 bytes of stack frame, 0 spill bytes) and use
at most 128 registers per thread (fp32 in the default tier, fp16 / bf16 in the slow tier).
(K = 9 may use local memory; docs/benchmarks.md lists it.) The report is cached by the hash of
the kernel source, the options and the NVRTC version, so only a changed kernel recompiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
from host_shim.host_launcher import _cache_dir

from robustlr.ops import cupy_backend, nvrtc
from robustlr.ops.bank_model import (
    loader_store_transactions,
    transactions,
    vector_transactions,
    window_read_transactions,
)
from robustlr.ops.sass import loop_tree, sass_loops

try:
    from cupy.cuda import nvrtc as cupy_nvrtc
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("CuPy is not importable: no NVRTC to compile with", allow_module_level=True)

KS, STRIDES, ARCHS = (3, 5, 7), (1, 2), ("sm_80", "sm_90")


def _table_for(arch: str, ctypes_: tuple[str, ...]) -> list[nvrtc.KernelUsage]:
    return nvrtc.ptxas_table(KS, STRIDES, (arch,), ctypes_)


#: The storage types per tier: fp32 in the default tier, fp16 and bf16 in the slow tier (a cold
#: ptxas run of all three takes about 90 s on 2 cores: each kernel holds one body per
#: composability).
TIERS = [
    pytest.param(("float",), id="fp32"),
    pytest.param(("lr_half", "lr_bf16"), id="fp16-bf16", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=TIERS)
def table(request) -> list[nvrtc.KernelUsage]:
    ctypes_ = request.param
    key = hashlib.sha256()
    key.update(nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE).encode())
    key.update(
        repr((nvrtc.GPU_OPTIONS, cupy_nvrtc.getVersion(), KS, STRIDES, ARCHS, ctypes_)).encode()
    )
    path = _cache_dir() / f"ptxas-{key.hexdigest()[:20]}.json"
    if path.exists():
        rows = json.loads(path.read_text())
        return [nvrtc.KernelUsage(**{**r, "usage": nvrtc.PtxasUsage(**r["usage"])}) for r in rows]
    # one process per architecture: ptxas time dominates the cold-cache run
    with ProcessPoolExecutor(len(ARCHS), mp_context=get_context("spawn")) as pool:
        parts = pool.map(_table_for, ARCHS, [ctypes_] * len(ARCHS))
    rows = [row for part in parts for row in part]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    tmp.replace(path)
    return rows


def test_every_instantiation_is_reported(table):
    ctypes_ = {r.ctype for r in table}
    assert ctypes_ in ({"float"}, {"lr_half", "lr_bf16"})
    seen = {(r.kernel, r.ctype, r.kernel_size, r.stride, r.arch) for r in table}
    want = {
        (k, c, K, s, a)
        for k in nvrtc.KERNEL_NAMES
        for c in ctypes_
        for K in KS
        for s in STRIDES
        for a in ARCHS
    }
    assert seen == want


def test_no_stack_frame_and_no_spills(table):
    over = [
        f"{r.kernel}<{r.ctype}, {r.kernel_size}, {r.stride}> {r.arch}: {r.usage}"
        for r in table
        if r.usage.stack_frame or r.usage.spill_stores or r.usage.spill_loads
    ]
    assert not over, "local memory used:\n" + "\n".join(over)


def test_registers_leave_room_for_two_blocks_per_sm(table):
    """255 registers is ptxas's cap; every kernel must still fit two 128-thread blocks."""
    for r in table:
        blocks, _ = nvrtc.occupancy(r.usage, r.arch)
        assert blocks >= 2, r


#: Issue 19's register budget: every kernel at K <= 7 keeps 4 resident 128-thread blocks per SM
#: (65,536 registers / (4 x 128)).
MAX_REGISTERS = 128


def test_registers_within_the_budget(table):
    """<= MAX_REGISTERS per thread for every instantiation (K <= 7): the v3 kernels hold MC
    channel accumulators, never a K x K window array (the v2 backward_query needed 244)."""
    over = [
        f"{r.kernel}<{r.ctype}, {r.kernel_size}, {r.stride}> {r.arch}: {r.usage.registers}"
        for r in table
        if r.usage.registers > MAX_REGISTERS
    ]
    assert not over, f"more than {MAX_REGISTERS} registers:\n" + "\n".join(over)


def test_static_shared_memory_formula_is_what_ptxas_reports(table):
    """cupy_backend.static_shared_bytes (used by kernels_fit and the host launcher) mirrors the
    kernels' LR_SHARED arrays byte for byte."""
    for r in table:
        want = cupy_backend.static_shared_bytes(r.kernel, r.kernel_size, r.stride)
        assert r.usage.shared == want, r


def test_packed_kernels_keep_two_blocks_per_sm_with_their_dynamic_shared_memory(table):
    """The packed kernels' tiles are dynamic shared memory (over 48 KB, so the launch opts in):
    with them, every instantiation that the plans may launch keeps >= 2 resident blocks per SM,
    3 on sm_90 at K = 7, stride 1 (LR-Net-26's small images); the pairs kernels' 44.5 and
    48.3 KB leave the 4 that their registers allow."""
    checked = 0
    for r in table:
        dynamic = cupy_backend.dynamic_shared_bytes(r.kernel, r.kernel_size, r.stride)
        if not 0 < dynamic <= cupy_backend.MAX_OPTIN_SHARED:
            continue
        blocks, _ = nvrtc.occupancy(r.usage, r.arch, dynamic=dynamic)
        assert blocks >= 2, (r, dynamic)
        if (r.kernel_size, r.stride, r.arch) == (7, 1, "sm_90"):
            assert blocks == (4 if r.kernel.endswith("_pairs") else 3), (r, dynamic)
        checked += 1
    assert checked >= 2 * 13  # sm_80, sm_90: 5 forward, 5 backward query, 3 backward input


def test_registers_per_block_within_the_register_file(table):
    threads = cupy_backend.TILE[0] * cupy_backend.TILE[1]
    for r in table:
        assert r.usage.registers * threads <= 65536, r


# ---- shared-memory bank conflicts of the window reads -----------------------------------------


def test_phase_layout_is_a_permutation_of_each_row():
    """lr_phase_col puts the columns of a row in distinct slots below the pitch (a loader that
    wrote two columns to one slot would pass the bank count and corrupt the tile)."""
    for K in range(1, 14, 2):
        for S in range(1, 8):
            iw = (cupy_backend.TILE[0] - 1) * S + K
            slots = [cupy_backend.phase_col(c, iw, S) for c in range(iw)]
            for strip in {cupy_backend.forward_strip(K, S), cupy_backend.query_strip(K, S)}:
                pitch = cupy_backend.shared_pitch(iw, S, strip * S)
                assert len(set(slots)) == iw and max(slots) < pitch


#: Every kernel, K = 3..13 and strides 1-3 (cupy_backend.STRIDE_ONE_KERNELS at stride 1 only).
WINDOW_READ_CASES = [
    (kernel, K, S)
    for kernel in nvrtc.KERNEL_NAMES
    for K in (3, 5, 7, 9, 11, 13)
    for S in (1, 2, 3)
    if kernel not in cupy_backend.STRIDE_ONE_KERNELS or S == 1
]


@pytest.mark.parametrize(("kernel", "K", "S"), WINDOW_READ_CASES)
def test_window_reads_are_one_transaction_per_warp(kernel, K, S):
    assert window_read_transactions(kernel, K, S) == 1


@pytest.mark.parametrize(("K", "S"), [(3, 1), (5, 1), (7, 1), (5, 2), (7, 2)])
@pytest.mark.parametrize("kernel", ["lr_forward", "lr_backward_query"])
def test_tile_loader_stores_rotate_the_planes_of_a_group(kernel, K, S):
    """The tile loader copies every plane of its positions (one geometry per position), a
    group's V planes in an order rotated by lane: a warp's store request then costs at most 3
    transactions (2 where its 32 positions cross a padded row, 3 at stride 2 with pairs), where
    every lane storing the same plane would cost at least V, and more than the rotated order
    (the 32 positions' words are V apart). The staged k and channel tiles of the kernel at
    (K, S), its vector width."""
    R = cupy_backend.strip(kernel, K, S)
    V = cupy_backend.vector_width(kernel, K, S)
    cols, rows = (cupy_backend.TILE[0] - 1) * S + K, (cupy_backend.TILE[1] * R - 1) * S + K
    pitch = cupy_backend.shared_pitch(cols, S, R * S)
    for width in {1, V}:
        worst, _ = loader_store_transactions(rows, cols, pitch, width, S)
        assert worst <= 3, (width, worst)
        if width > 1:
            unrotated, _ = loader_store_transactions(rows, cols, pitch, width, S, rotated=False)
            assert unrotated >= width and unrotated > worst, (width, worst, unrotated)


def test_bank_conflict_model_sees_conflicts():
    """The count is not trivially 1: the v2 layout at stride 2 (plain columns, pitch 37 at
    K = 7) is a 2-way conflict, and an unpadded pitch of 22 at stride 1, K = 7 is 2-way too."""
    v2 = [ty * 2 * 37 + tx * 2 + b for ty in (0, 1) for tx in range(16) for b in (0,)]
    assert transactions(v2) == 2
    assert transactions([ty * 22 + tx for ty in (0, 1) for tx in range(16)]) == 2
    assert transactions([ty * 48 + tx for ty in (0, 1) for tx in range(16)]) == 1
    assert transactions([0] * 32) == 1  # a broadcast
    # vector reads: quads of 32 consecutive positions take the fewest wavefronts (4), quads of
    # every other position twice as many (each quarter-warp's 8 quads span 64 words)
    assert vector_transactions(list(range(32)), 4) == 4
    assert vector_transactions([2 * i for i in range(32)], 4) == 8


# ---- the tile loader's global loads, in the SASS ----------------------------------------------

# A kernel that only runs the tile loader once: two planes of a 38 x 22 tile (K = 7, stride 1,
# 32 rows of outputs) at pitch 28: 7 trips of 128 threads; T is the planes' storage type.
_LOADER_PROBE = """
__global__ void lr_probe_loader(const T* __restrict__ plane, float* __restrict__ out,
                                long long H, long long W) {
    LR_SHARED(float, s, 2 * 38 * 28);
    const int tid = threadIdx.y * LR_TILE_W + threadIdx.x;
    lr_load_phased<38, 22, 1, 28, 2>(s, 38 * 28, plane, H * W, 2, -3, -3, H, W, tid);
    __syncthreads();
    out[tid] = s[(tid * 5) % (2 * 38 * 28)];
}
"""


def loader_sass(storage: str) -> list[str]:
    """The memory operations and barriers of the probe's sm_90 SASS, in order."""
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip("nvdisasm is not available (PATH or the triton package)")
    probe = _LOADER_PROBE.replace("const T*", f"const {storage}*")
    source = nvrtc.load_kernel_source("lr_common.cuh") + probe
    prog = nvrtc.compile_source(source, ["lr_probe_loader"], "sm_90")
    return re.findall(r"\b(LDGSTS|LDGDEPBAR|DEPBAR|LDG|STS|BAR)\b", nvrtc.sass(prog, nvdisasm))


def ldg_runs(ops: list[str]) -> list[int]:
    """Lengths of the runs of global loads (LDG) between shared stores / barriers (STS, BAR)."""
    runs, current = [], 0
    for op in ops:
        if op == "LDG":
            current += 1
        elif op in ("STS", "BAR") and current:
            runs.append(current)
            current = 0
    return runs + ([current] if current else [])


# A kernel with one loop of 4 FFMAs (unroll 1) between straight-line code: 3 FMULs before it
# and a 64-bit division after it (its 32-bit fast path inline, its slow path a call of the
# runtime's subroutine).
_LOOP_PROBE = """
__global__ void lr_probe_loop(const float* __restrict__ in, float* __restrict__ out, int n,
                              long long d) {
    float a = in[threadIdx.x] * 3.0f, b = a * in[1], c = b * in[2];
#pragma unroll 1
    for (int i = 0; i < n; ++i) {
        a = fmaf(a, b, c);
        b = fmaf(b, c, a);
        c = fmaf(c, a, b);
        a = fmaf(a, c, b);
    }
    out[threadIdx.x] = a + (float)((long long)n * 977 / d);
}
"""


def test_loop_tree_finds_the_loop_and_the_longest_path_around_it():
    """sass.loop_tree (the roofline's count of the code outside the loops) finds the probe's one
    loop, whose path is its 4 FFMAs; the kernel's path around it holds the 3 FMULs and the
    division's fast path, and neither the loop's FFMAs nor the call of its slow path (which
    the kernel's code does hold)."""
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip("nvdisasm is not available (PATH or the triton package)")
    prog = nvrtc.compile_source(_LOOP_PROBE, ["lr_probe_loop"], "sm_90")
    text = nvrtc.sass(prog, nvdisasm)
    tree = loop_tree(text)
    (loop,) = tree.children
    assert not loop.children and loop.path["FFMA"] == 4
    assert [lp.first for lp in sass_loops(text)] == [loop.first]
    assert tree.path["FMUL"] == 3 and tree.path["FFMA"] == 0
    assert "__internal" in text and tree.ops["CALL"] == 1  # the division's slow path
    assert tree.path["CALL"] == 0 and tree.path["MUFU"] == 1  # its fast path (a reciprocal)
    assert tree.path.total() < tree.ops.total() - loop.ops.total()


# Hand-written SASS in nvdisasm's layout: a branch around a slow path (a call of the runtime's
# division) whose other side is shorter, a loop with an inner loop and a forward branch around
# two FMULs, and ptxas's trap loop after the exit (reached by no path).
_TREE_SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 BRA `(.L_x_1) ;
        /*0020*/                   IMAD R1, R0, R0, RZ ;
        /*0030*/                   IMAD R1, R1, R0, RZ ;
        /*0040*/                   IMAD R1, R1, R0, RZ ;
        /*0050*/                   MOV R2, 0x70 ;
        /*0060*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0070*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0080*/                   IADD3 R1, R0, 0x1, RZ ;
.L_x_2:
        /*0090*/                   FMUL R3, R1, R1 ;
.L_x_3:
        /*00a0*/                   FADD R3, R3, 1 ;
.L_x_4:
        /*00b0*/                   FFMA R3, R3, R3, R3 ;
        /*00c0*/               @P1 BRA `(.L_x_4) ;
        /*00d0*/               @P2 BRA `(.L_x_5) ;
        /*00e0*/                   FMUL R3, R3, R3 ;
        /*00f0*/                   FMUL R3, R3, R3 ;
.L_x_5:
        /*0100*/               @P3 BRA `(.L_x_3) ;
        /*0110*/                   EXIT ;
.L_x_6:
        /*0120*/                   BRA `(.L_x_6) ;
"""


def test_loop_tree_takes_the_longest_path_that_calls_nothing():
    """On hand-written SASS: the kernel's path takes the short side of the branch (the long side
    calls the division's slow path), the outer loop's path the FMULs its branch may skip, the
    inner loop is the outer loop's one child, and the trap loop after the exit is no loop."""
    tree = loop_tree(_TREE_SASS)
    (outer,) = tree.children
    (inner,) = outer.children
    assert tree.path == Counter({"S2R": 1, "BRA": 1, "IADD3": 1, "FMUL": 1, "EXIT": 1})
    assert tree.ops["CALL"] == 1 and tree.ops["IMAD"] == 3
    assert (outer.first, outer.last) == (0xA0, 0x100)
    assert outer.path == Counter({"FADD": 1, "BRA": 2, "FMUL": 2})
    assert (inner.first, inner.last, inner.path) == (0xB0, 0xC0, Counter({"FFMA": 1, "BRA": 1}))
    assert not inner.children


def test_tile_loader_issues_its_loads_before_its_stores():
    """lr_load_planes of a 16-bit plane keeps a batch of global loads in flight per thread (one
    memory latency per batch and plane, benchmarks/roofline.py counts it): in the sm_90 SASS the
    loader of a 7-trip tile is a loop over the planes whose body is one run of 7 LDG (a batch of
    up to LR_LOAD_BATCH = 8 elements), where v2's loop issued one load per shared store (runs of
    1)."""
    assert ldg_runs(loader_sass("lr_half")) == [7]


def test_tile_loader_copies_fp32_asynchronously():
    """On sm_80+ an fp32 tile element is one cp.async (LDGSTS: no register, no separate load and
    store), and a thread waits for its copies once, after every plane and before the barrier."""
    ops = loader_sass("float")
    assert "LDG" not in ops and "STS" not in ops
    assert ops == ["LDGSTS"] * 7 + ["LDGDEPBAR", "DEPBAR", "BAR"]


# ---- the window loops, in the SASS ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel", ["lr_forward", "lr_forward_pairs", "lr_forward_packed", "lr_backward_query"]
)
def test_window_loops_leave_outside_neighbours_out_by_their_key(kernel):
    """The k tiles hold LR_FAR_KEY outside the image, so sqdiff's window loop (and absdiff's in
    the forward) weighs a neighbour with no test: in the sm_90 SASS of the fp32 K = 7 kernel,
    some window loop (a loop with MUFU.EX2) has no FSEL, while mul's (and the forward's variant
    for NaN prior logits) keep theirs."""
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip("nvdisasm is not available (PATH or the triton package)")
    source = nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE)
    prog = nvrtc.compile_source(source, [nvrtc.name_expression(kernel, "float", 7, 1)], "sm_90")
    loops = [lp for lp in sass_loops(nvrtc.sass(prog, nvdisasm)) if lp.every["MUFU"] or lp.pairs]
    tested = [lp.every["FSEL"] + sum(pair["FSEL"] for pair in lp.pairs) > 0 for lp in loops]
    assert not all(tested), "every window loop tests its neighbours"
    assert any(tested), "mul's window loop lost its test"


@pytest.mark.slow
def test_arrays_read_by_vector_loads_are_16_byte_aligned():
    """A 128-bit shared load from an address that is not a multiple of 16 faults on the GPU: in
    the PTX every kernel's channel tiles (s_x; backward_input's s_out) are declared .align 16,
    lr_forward_packed's dynamic shared memory (its channel tiles first) too."""
    source = nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE)
    names = [nvrtc.name_expression(k, "float", 7, 1) for k in nvrtc.KERNEL_NAMES]
    ptx = nvrtc.compile_source(source, names, "compute_90").binary.decode()
    declared = re.findall(r"\.shared \.align (\d+) \.b8 _ZZ\d+(\w+?)I\w*E\d+(s_\w+)\[", ptx)
    vector = {(kernel, array): int(align) for align, kernel, array in declared}
    assert vector[("lr_forward", "s_x")] == 16
    assert vector[("lr_backward_query", "s_x")] == 16
    assert vector[("lr_backward_input", "s_out")] == 16
    assert ".extern .shared .align 16 .b8 s_x[];" in ptx  # lr_forward_packed's tiles


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kernel", "K", "S"),
    [
        ("lr_forward", 7, 1),
        ("lr_forward", 7, 2),
        ("lr_forward", 7, 3),
        ("lr_forward", 9, 1),
        ("lr_forward_pairs", 7, 1),
        ("lr_forward_packed", 7, 1),
        ("lr_forward_packed", 5, 2),
        ("lr_backward_query", 7, 1),
        ("lr_backward_query", 5, 2),
        ("lr_backward_input", 7, 1),
    ],
)
def test_window_loops_read_channels_with_vector_loads(kernel, K, S):
    """Staged channels side by side are read V at a time (``cupy_backend.vector_width``, the
    kernels' lr_vec_width rule): in the sm_90 SASS of the fp32 kernel every window loop with exp
    holds LDS.128 where V = 4, LDS.64 where V = 2, neither where V = 1 (an odd chunk). Its
    guarded blocks without exp are left out: backward_query's grad-geo reduction, whose second
    phase reads a thread's 8 partial sums with two LDS.128 since its array shares the kernel's
    one 16-byte-aligned shared array (v14)."""
    width = cupy_backend.vector_width(kernel, K, S)
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip("nvdisasm is not available (PATH or the triton package)")
    source = nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE)
    prog = nvrtc.compile_source(source, [nvrtc.name_expression(kernel, "float", K, S)], "sm_90")
    loops = [
        lp
        for lp in sass_loops(nvrtc.sass(prog, nvdisasm))
        if lp.every["MUFU"] or any(pair["MUFU"] for pair in lp.pairs)
    ]
    assert loops
    for lp in loops:
        reads = lp.every - sum((g for g in lp.guarded if not g["MUFU"]), Counter())
        assert (reads["LDS.128"] > 0) == (width == 4), (width, lp.every)
        assert (reads["LDS.64"] > 0) == (width == 2), (width, lp.every)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", nvrtc.KERNEL_NAMES)
def test_window_columns_are_not_peeled_off_their_loop(kernel):
    """Every exp of the fp32 K = 7 kernel (MUFU.EX2 in its sm_90 SASS) lies in an innermost
    loop: the compiler did not peel a window column off its loop (lr_strip_columns hides the
    column count), so the roofline's loop counts and the code around them (loop_tree) do not
    count one column twice."""
    nvdisasm = nvrtc.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip("nvdisasm is not available (PATH or the triton package)")
    source = nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE)
    prog = nvrtc.compile_source(source, [nvrtc.name_expression(kernel, "float", 7, 1)], "sm_90")
    text = nvrtc.sass(prog, nvdisasm)
    exps = [int(a, 16) for a in re.findall(r"/\*([0-9a-f]{4,})\*/\s+MUFU\.EX2", text)]
    loops = sass_loops(text)
    assert exps
    assert all(any(lp.first <= a <= lp.last for lp in loops) for a in exps)


def test_vector_width_cases_cover_every_width():
    """The SASS check above sees each width the kernels use: 1 (an odd chunk: the forward at
    K = 7, stride 3), 2 and 4 (the forward at strips of 4 too, since v11)."""
    cases = [("lr_forward", 7, 3), ("lr_forward", 7, 2), ("lr_forward", 7, 1)]
    assert [cupy_backend.vector_width(*case) for case in cases] == [1, 2, 4]
    packed = [("lr_forward_packed", 7, 1), ("lr_forward_packed", 5, 2)]
    assert [cupy_backend.vector_width(*case) for case in packed] == [4, 4]
