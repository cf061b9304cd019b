"""The CUDA execution emulator (tests/host_shim/cuda_emulator.h) and its sanitizer builds.

- the emulator's warp intrinsics, atomics, barriers and dynamic shared memory compute what a GPU
  computes;
- the real backend's launches (forward and backward, recorded through the host launcher) replay
  clean under AddressSanitizer + UndefinedBehaviorSanitizer and under ThreadSanitizer, with the
  same results as the plain build;
- negative controls: a kernel reading one element past its input makes ASan fire, a kernel
  missing a __syncthreads makes TSan fire (and its fixed twin is clean), a kernel reading a
  shared slot it never loaded reads the poison (NaN) in every block, two blocks writing one
  element make TSan fire (blocks of a launch run concurrently; the twin writing its own element
  is clean), a kernel reading a tile of asynchronous copies (cp.async) it did not wait for reads
  the poison (the twin that waits reads the copies, and zeros where a copy ignores its source).
The sanitizer builds are cached by source hash; the default tier replays small shapes, the slow
tier K = 7 (fp32 and bf16) on images of >= 3 x 3 tiles with B = 2.
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch
from host_shim.host_launcher import (
    RecordingLauncher,
    ScriptArg,
    build_library,
    kernel_parameters,
    run_sanitized,
    write_script,
)
from lr_naive import make_case

from robustlr.ops import cupy_backend
from robustlr.ops.contract import check_inputs

if shutil.which("g++") is None:  # pragma: no cover - depends on the machine
    pytest.skip("g++ is not installed", allow_module_level=True)


def config(grid: int, block: int, shared: int = 0) -> cupy_backend.LaunchConfig:
    return cupy_backend.LaunchConfig("control", (grid, 1, 1), (block, 1, 1), shared)


def read_out(directory, launch: int, arg: int, like: torch.Tensor) -> torch.Tensor:
    data = (directory / f"out{launch}_{arg}.bin").read_bytes()
    if not data:  # an empty buffer (the backward query's global workspace where it is unused)
        return torch.empty_like(like)
    return torch.frombuffer(bytearray(data), dtype=like.dtype).view(like.shape)


def record_backend(lib, case, dtype=torch.float32):
    """Forward + backward of the real backend Function through a RecordingLauncher."""
    B, C, H, W, G, K, s, comp = case
    x, q, k, geo, gy = make_case(B, C, H, W, G, K, s, dtype=dtype, seed=23)
    shape = check_inputs(x, q, k, geo, K, s, comp)
    made = []

    def factory(device, ctype, kernel_size, stride):
        made.append(RecordingLauncher(lib, ctype, kernel_size, stride))
        return made[-1]

    leaves = [t.clone().requires_grad_() for t in (x, q, k, geo)]
    y = cupy_backend.local_relation_cupy(*leaves, shape, comp, launcher=factory)
    torch.autograd.grad(y, leaves, gy)
    script = [entry for launcher in made for entry in launcher.script]
    after = [entry for launcher in made for entry in launcher.after]
    return script, after


@pytest.fixture(scope="module")
def plain():
    return ctypes.CDLL(str(build_library("plain")))


# (case, dtype): ragged last group, fp16 storage at stride 2, small images (lr_forward_packed,
# several blocks per group); the slow tier adds an image smaller than the window (fp32, stride
# 2), the backward query's key-gradient copies in global memory (K = 3, stride 4: 2 x 2
# tiles), two images a block (lr_forward_pairs, lr_backward_query_pairs and
# lr_backward_input_pairs: 14 x 14, 2 + 1 images per group), K = 7 in fp32
# and bf16 over >= 3 x 3 tiles (16 x 32 forward outputs at stride 1: strips of 4; 16 x 16
# otherwise: strips of 2) with B = 2, and lr_forward_packed at strips of 2
SANITIZED_CASES = [
    ((1, 5, 6, 5, 2, 3, 1, "sqdiff"), torch.float32),
    pytest.param((1, 3, 4, 3, 3, 5, 2, "absdiff"), torch.float32, marks=pytest.mark.slow),
    ((1, 4, 5, 4, 2, 3, 2, "mul"), torch.float16),
    pytest.param((2, 2, 68, 66, 1, 3, 4, "absdiff"), torch.float32, marks=pytest.mark.slow),
    # lr_forward_packed: 10 images of 7 x 7 per group, two blocks (8 + 2 slots) per group
    ((10, 4, 7, 7, 2, 7, 1, "sqdiff"), torch.float32),
    pytest.param((3, 4, 14, 14, 2, 7, 1, "sqdiff"), torch.float32, marks=pytest.mark.slow),
    pytest.param((2, 4, 66, 33, 2, 7, 1, "sqdiff"), torch.float32, marks=pytest.mark.slow),
    pytest.param((2, 3, 130, 66, 3, 7, 2, "mul"), torch.bfloat16, marks=pytest.mark.slow),
    # lr_forward_packed at strips of 2 (channels read as quads): 4 x 8 outputs, 9 images
    pytest.param((9, 6, 8, 16, 3, 3, 2, "mul"), torch.float16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("variant", ["asan", "tsan"])
@pytest.mark.parametrize(
    ("case", "dtype"),
    SANITIZED_CASES,
    ids=lambda v: str(v).split(".")[-1] if isinstance(v, torch.dtype) else "B{}H{}K{}s{}".format(
        v[0], v[2], *v[5:7]),
)  # fmt: skip
def test_backend_launches_are_clean_under_sanitizers(plain, tmp_path, variant, case, dtype):
    script, after = record_backend(plain, case, dtype)
    shape = check_inputs(*make_case(*case[:7])[:4], *case[5:])
    query = cupy_backend.query_kernel(shape)
    slotted_query = query != "lr_backward_query"
    assert [name.split("<")[0] for name, _, _ in script] == [
        cupy_backend.plan_forward(shape).kernel,
        query,
        cupy_backend.plan_backward_input(shape).kernel,
    ]
    proc = run_sanitized(variant, write_script(tmp_path, script))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "replayed 3 launches" in proc.stdout
    for i, (name, _, args) in enumerate(script):
        params = [p for _, p in kernel_parameters(name.split("<")[0], "float")]
        for n, arg in enumerate(args):
            # lr_backward_query_packed and _pairs write the grad-k partials of the images'
            # positions only (lr_backward_input reads no other): the rest of the buffer is
            # whatever it held
            if slotted_query and params[n] == "gk_partial":
                continue
            if arg.kind == "ptr":
                got = read_out(tmp_path, i, n, arg.value)
                assert torch.equal(got, after[i][n]), f"launch {i} argument {n}"


def test_asan_fires_on_a_read_past_the_end(tmp_path):
    n = 40
    src = torch.arange(n, dtype=torch.float32)
    out = torch.zeros(n)
    launch = ("lr_read_past_end", config(2, 32), [ScriptArg("ptr", src), ScriptArg("ptr", out),
              ScriptArg("i64", n)])  # fmt: skip
    proc = run_sanitized("asan", write_script(tmp_path, [launch]))
    assert proc.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr
    assert "READ of size 4" in proc.stderr


def test_guard_catches_a_write_past_the_end(tmp_path):
    """The builds without AddressSanitizer (plain, TSan) follow every buffer with a guard: a
    write past the end fails the launch (the TSan build's replay here)."""
    n = 40
    launch = ("lr_write_past_end", config(2, 32), [ScriptArg("ptr", torch.arange(n + 0.0)),
              ScriptArg("ptr", torch.zeros(n)), ScriptArg("i64", n)])  # fmt: skip
    proc = run_sanitized("tsan", write_script(tmp_path, [launch]))
    assert proc.returncode != 0
    assert "lr_host_launch(lr_write_past_end) returned 3" in proc.stderr


def test_tsan_fires_on_a_missing_syncthreads(tmp_path):
    src = torch.arange(128, dtype=torch.float32)
    racy = (
        "lr_missing_sync",
        config(2, 64),
        [ScriptArg("ptr", src), ScriptArg("ptr", torch.zeros(128))],
    )
    proc = run_sanitized("tsan", write_script(tmp_path, [racy]))
    assert proc.returncode != 0
    assert "ThreadSanitizer: data race" in proc.stderr


def test_tsan_is_clean_with_the_barrier(tmp_path):
    src = torch.arange(128, dtype=torch.float32)
    fixed = (
        "lr_with_sync",
        config(2, 64),
        [ScriptArg("ptr", src), ScriptArg("ptr", torch.zeros(128))],
    )
    proc = run_sanitized("tsan", write_script(tmp_path, [fixed]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = read_out(tmp_path, 0, 1, src)
    want = src.view(2, 64).flip(1).reshape(-1)
    assert torch.equal(got, want)


def test_warp_intrinsics_atomics_and_dynamic_shared_memory(tmp_path):
    block = 64
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(-5, 6, (block,), generator=gen).float()
    src[40] = 200.0  # warp 1 has a value > 100
    launch = ("lr_warp_ops", config(1, block, shared=block * 4),
              [ScriptArg("ptr", src), ScriptArg("ptr", torch.zeros(32))])  # fmt: skip
    proc = run_sanitized("asan", write_script(tmp_path, [launch]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = read_out(tmp_path, 0, 1, torch.zeros(32))
    assert out[5] == src.sum()
    for w in range(2):
        lanes = src[32 * w : 32 * w + 32]
        row = out[8 + 8 * w : 16 + 8 * w]
        assert row[0] == lanes.sum()  # xor butterfly: every lane holds the sum
        assert row[1] == lanes.sum()  # shfl_down tree: lane 0 holds the sum
        assert row[2] == lanes[3]
        bits = sum(1 << i for i in range(32) if lanes[i] > 0)
        assert int(row[3].item()) + (int(row[7].item()) << 16) == bits
        assert row[4] == float((lanes > 100).any())
        assert row[5] == 1.0
        assert row[6] == src[(32 * w + 33) % block]  # written by another warp before the barrier


def test_poisoned_shared_memory_catches_an_unloaded_slot(tmp_path):
    """Every block starts with NaN in shared memory: the slot the kernel never loads reads NaN
    in every block (4 blocks on 2 concurrent slots: the re-poisoning between blocks counts)."""
    block, grid = 64, 4
    src = torch.arange(block * grid, dtype=torch.float32)
    launch = ("lr_unloaded_slot", config(grid, block),
              [ScriptArg("ptr", src), ScriptArg("ptr", torch.zeros(block * grid))])  # fmt: skip
    proc = run_sanitized("asan", write_script(tmp_path, [launch]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = read_out(tmp_path, 0, 1, src).view(grid, block)
    assert got[:, 0].isnan().all()  # thread 0 reads the unloaded last slot
    want = src.view(grid, block).flip(1)
    assert torch.equal(got[:, 1:], want[:, 1:])


def test_asynchronous_copies_land_only_at_the_wait(tmp_path):
    """The emulator lands a thread's lr_copy_async copies at its lr_copy_wait: read without the
    wait, the tile is poison in every block; with it, the copies and the zero fill."""
    block, grid = 64, 4
    src = torch.arange(block * grid, dtype=torch.float32) + 1.0
    launches = [
        (
            name,
            config(grid, block),
            [ScriptArg("ptr", src), ScriptArg("ptr", torch.zeros(block * grid))],
        )
        for name in ("lr_copy_unwaited", "lr_copy_waited")
    ]
    proc = run_sanitized("asan", write_script(tmp_path, launches))
    assert proc.returncode == 0, proc.stderr[-4000:]
    unwaited = read_out(tmp_path, 0, 1, src).view(grid, block)
    assert unwaited.isnan().all()
    waited = read_out(tmp_path, 1, 1, src).view(grid, block)
    want = src.view(grid, block).flip(1)
    assert (waited[:, 0] == 0).all()  # the last slot's copy ignores its source: a zero
    assert torch.equal(waited[:, 1:], want[:, 1:])


def test_misaligned_vector_reads_abort(tmp_path):
    """A 4-word shared load (lr_read_vec, LDS.128 on the GPU) must start on a 16-byte boundary,
    or a GPU faults: the emulator aborts on the misaligned one and reads the aligned one."""
    block, grid = 64, 2
    src = torch.arange(block * grid, dtype=torch.float32) + 1.0

    def launch(shift):
        args = [ScriptArg("ptr", src), ScriptArg("ptr", torch.zeros(block * grid)),
                ScriptArg("i32", shift)]  # fmt: skip
        return ("lr_vector_read", config(grid, block), args)

    aligned = run_sanitized("asan", write_script(tmp_path, [launch(4)]))
    assert aligned.returncode == 0, aligned.stderr[-4000:]
    got = read_out(tmp_path, 0, 1, src).view(grid, block)
    want = torch.cat([src.view(grid, block)[:, 4:], torch.zeros(grid, 4)], dim=1)
    assert torch.equal(got, want)
    misaligned = run_sanitized("asan", write_script(tmp_path, [launch(1)]))
    assert misaligned.returncode != 0
    assert "misaligned 16-byte vector load" in misaligned.stderr


def test_tsan_fires_on_a_race_between_blocks(tmp_path):
    racy = ("lr_block_race", config(4, 32), [ScriptArg("ptr", torch.zeros(4))])
    proc = run_sanitized("tsan", write_script(tmp_path, [racy]))
    assert proc.returncode != 0
    assert "ThreadSanitizer: data race" in proc.stderr


def test_tsan_is_clean_when_blocks_write_their_own_elements(tmp_path):
    fixed = ("lr_block_own", config(4, 32), [ScriptArg("ptr", torch.zeros(4))])
    proc = run_sanitized("tsan", write_script(tmp_path, [fixed]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(read_out(tmp_path, 0, 0, torch.zeros(4)), torch.ones(4))
