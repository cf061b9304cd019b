"""The register budget of the GPU kernels, from ptxas itself (NVRTC with -Xptxas=-v, no GPU).

Every instantiation with K in {3, 5, 7}, stride in {1, 2}, fp32 / fp16 / bf16, on sm_80 and
sm_90 must keep its per-thread state in registers: 0 bytes of stack frame, 0 spill bytes.
(K = 9 may use local memory; docs/benchmarks.md lists it.) The report is cached by the hash of
the kernel source, the options and the NVRTC version, so only a changed kernel recompiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
from host_shim.host_launcher import _cache_dir

from robustlr.ops import cupy_backend, nvrtc

try:
    from cupy.cuda import nvrtc as cupy_nvrtc
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("CuPy is not importable: no NVRTC to compile with", allow_module_level=True)

KS, STRIDES, ARCHS = (3, 5, 7), (1, 2), ("sm_80", "sm_90")


def _table_for_arch(arch: str) -> list[nvrtc.KernelUsage]:
    return nvrtc.ptxas_table(KS, STRIDES, (arch,))


@pytest.fixture(scope="module")
def table() -> list[nvrtc.KernelUsage]:
    key = hashlib.sha256()
    key.update(nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE).encode())
    key.update(repr((nvrtc.GPU_OPTIONS, cupy_nvrtc.getVersion(), KS, STRIDES, ARCHS)).encode())
    path = _cache_dir() / f"ptxas-{key.hexdigest()[:20]}.json"
    if path.exists():
        rows = json.loads(path.read_text())
        return [nvrtc.KernelUsage(**{**r, "usage": nvrtc.PtxasUsage(**r["usage"])}) for r in rows]
    # one process per architecture: ptxas time dominates the cold-cache run
    with ProcessPoolExecutor(len(ARCHS), mp_context=get_context("spawn")) as pool:
        parts = pool.map(_table_for_arch, ARCHS)
    rows = [row for part in parts for row in part]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    tmp.replace(path)
    return rows


def test_every_instantiation_is_reported(table):
    seen = {(r.kernel, r.ctype, r.kernel_size, r.stride, r.arch) for r in table}
    want = {
        (k, c, K, s, a)
        for k in nvrtc.KERNEL_NAMES
        for c in nvrtc.CTYPES
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


def test_static_shared_memory_formula_is_what_ptxas_reports(table):
    """cupy_backend.static_shared_bytes (used by kernels_fit and the host launcher) mirrors the
    kernels' LR_SHARED arrays byte for byte."""
    for r in table:
        want = cupy_backend.static_shared_bytes(r.kernel, r.kernel_size, r.stride)
        assert r.usage.shared == want, r


def test_registers_per_block_within_the_register_file(table):
    threads = cupy_backend.TILE[0] * cupy_backend.TILE[1]
    for r in table:
        assert r.usage.registers * threads <= 65536, r


# ---- shared-memory bank conflicts of the window reads -----------------------------------------


def transactions(addresses: list[int]) -> int:
    """Shared-memory transactions of one warp request of 4-byte words: the most distinct words
    that fall in one of the 32 banks (lanes reading the same word share it)."""
    per_bank: dict[int, set[int]] = {}
    for a in addresses:
        per_bank.setdefault(a % 32, set()).add(a)
    return max(len(words) for words in per_bank.values())


def window_read_transactions(kernel: str, K: int, S: int) -> int:
    """Worst warp request over the window offsets of one kernel's window reads, from its index
    expressions in kernels/local_relation.cu (16 x 8 block, warp w = rows 2w and 2w + 1):
    forward / backward_query read tile[ty*S*PW + tx*S + a*PW + b], backward_input reads
    tile[(i_first - oi0)*PO + (j_first - oj0) + ti*PO + tj] for every tile origin modulo S."""
    tw, th = cupy_backend.TILE
    worst = 0
    for warp in range(tw * th // 32):
        lanes = [(t % tw, t // tw) for t in range(32 * warp, 32 * warp + 32)]
        if kernel in ("lr_forward", "lr_backward_query"):
            pw = cupy_backend.shared_pitch((tw - 1) * S + K, S)
            for a in range(K):
                for b in range(K):
                    req = [ty * S * pw + tx * S + a * pw + b for tx, ty in lanes]
                    worst = max(worst, transactions(req))
        else:
            nc = (K - 1) // S + 1
            po = cupy_backend.shared_pitch((tw + S - 2) // S + nc, S)
            P = K // 2
            for r0 in range(S):  # tile origins h0, w0 modulo S
                first0 = (r0 + P - K + S) // S
                for ti in range(nc):
                    for tj in range(nc):
                        req = [
                            ((r0 + ty + P - K + S) // S - first0) * po
                            + ((r0 + tx + P - K + S) // S - first0)
                            + ti * po
                            + tj
                            for tx, ty in lanes
                        ]
                        worst = max(worst, transactions(req))
    return worst


@pytest.mark.parametrize("K", [3, 5, 7, 9, 11, 13])
@pytest.mark.parametrize("kernel", nvrtc.KERNEL_NAMES)
def test_window_reads_are_one_transaction_per_warp_at_stride_1(kernel, K):
    assert window_read_transactions(kernel, K, 1) == 1


def test_bank_conflict_model_sees_conflicts():
    """The count is not trivially 1: stride 2 window reads of the forward are 2-way conflicts
    (documented in docs/gpu-kernels.md), and an unpadded pitch of 22 at K = 7 is 2-way too."""
    assert window_read_transactions("lr_forward", 7, 2) == 2
    assert transactions([ty * 22 + tx for ty in (0, 1) for tx in range(16)]) == 2
    assert transactions([ty * 48 + tx for ty in (0, 1) for tx in range(16)]) == 1
    assert transactions([0] * 32) == 1  # a broadcast
