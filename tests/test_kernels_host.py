"""The CuPy backend's real autograd Function on CPU tensors, its kernels run by the CUDA
execution emulator (tests/host_shim): kernels/local_relation.cu built with g++, every launch
checked against the kernel's C signature by ``host_launcher.HostLauncher``.

Results are compared with the float64 naive op of tests/lr_naive.py (autograd gradients).
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from host_shim.host_launcher import HostLauncher, LaunchError, build_library, host_factory
from lr_naive import assert_close_rel, make_case, naive_local_relation, output_and_grads

from robustlr.ops import cpu_backend, cupy_backend
from robustlr.ops.contract import check_inputs
from robustlr.ops.nvrtc import PtxasUsage
from robustlr.ops.reference import local_relation_reference

NAMES = ("y", "x", "q", "k", "geo")


@pytest.fixture(scope="session")
def lib() -> ctypes.CDLL:
    """The plain host build (cached by source hash across sessions)."""
    try:
        path = build_library("plain")
    except FileNotFoundError:
        pytest.skip("g++ is not installed: cannot build the kernels for the CPU")
    return ctypes.CDLL(str(path))


def backend_run(lib, x, q, k, geo, gy, K, s, comp, needs=(True,) * 4, **launcher_kwargs):
    """Output and requested gradients of the real CuPy-backend Function, run on the host.

    Shape: as local_relation; returns [y, gx, gq, gk, ggeo] (None where not requested).
    """
    shape = check_inputs(x, q, k, geo, K, s, comp)
    leaves = [
        t.detach().clone().requires_grad_(n) for t, n in zip((x, q, k, geo), needs, strict=True)
    ]
    factory = host_factory(lib, **launcher_kwargs)
    y = cupy_backend.local_relation_cupy(*leaves, shape, comp, launcher=factory)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, gy)) if wanted else iter(())
    out = [y.detach()] + [next(grads) if t.requires_grad else None for t in leaves]
    backend_run.made = factory.made
    return out


def naive_results(x, q, k, geo, gy, kernel_size, stride, composability):
    """Naive float64 output and autograd gradients of the same inputs: [y, gx, gq, gk, ggeo]."""
    leaves = [t.detach().double().requires_grad_() for t in (x, q, k, geo)]
    y = naive_local_relation(*leaves, kernel_size, stride, composability)
    grads = torch.autograd.grad(y, leaves, gy.double())
    return [y.detach(), *grads]


def check_case(lib, case, dtype=torch.float32, tol=1e-5, seed=0, **kwargs):
    B, C, H, W, G, K, s, comp = case
    x, q, k, geo, gy = make_case(B, C, H, W, G, K, s, dtype=dtype, seed=seed)
    got = backend_run(lib, x, q, k, geo, gy, K, s, comp, **kwargs)
    want = naive_results(x, q, k, geo, gy, K, s, comp)  # on the rounded inputs
    for name, a, e in zip(NAMES, got, want, strict=True):
        assert a.dtype == dtype, name
        assert_close_rel(a, e, tol, f"{name} ({case}, {dtype})")
    return got


# (B, C, H, W, G, K, stride, composability): every (K, stride) pair of {3,5,7,9} x {1,2,3},
# ragged last groups (C not divisible by m), m = 1, images smaller than the window, m larger
# than the kernels' channel chunk.
CASES = [
    (2, 6, 7, 8, 3, 3, 1, "sqdiff"),
    (1, 9, 7, 9, 3, 3, 2, "absdiff"),
    (1, 3, 9, 7, 1, 3, 3, "mul"),
    (2, 3, 6, 6, 3, 5, 1, "mul"),  # m = 1
    (1, 5, 6, 5, 2, 5, 2, "absdiff"),  # m = 3, last group holds 2
    (2, 10, 8, 9, 4, 5, 3, "sqdiff"),  # m = 3, last group holds 1
    (2, 4, 5, 6, 4, 7, 1, "mul"),  # m = 1
    (1, 4, 5, 5, 2, 7, 2, "absdiff"),  # image smaller than the window
    (1, 8, 10, 6, 2, 7, 3, "absdiff"),
    (1, 7, 4, 3, 3, 9, 1, "sqdiff"),  # m = 3, ragged, image smaller than the window
    (1, 2, 3, 2, 2, 9, 2, "mul"),  # tiny image, m = 1
    (1, 6, 8, 8, 2, 9, 3, "sqdiff"),
    # m = 10 > the 8 channels the kernels stage at once (lr_chunk): chunks of 8 + 2 and, in the
    # ragged last group of 9, 8 + 1
    (1, 19, 9, 10, 2, 3, 1, "sqdiff"),
    (1, 19, 7, 9, 2, 5, 2, "mul"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c))
def test_fp32_backend_matches_naive(lib, case):
    check_case(lib, case)


@pytest.fixture
def tiled_forward(monkeypatch):
    """lr_forward and lr_backward_input on every shape, small images too (not the packed
    kernels)."""
    monkeypatch.setattr(cupy_backend, "forward_packed", lambda shape: False)
    monkeypatch.setattr(cupy_backend, "forward_pairs", lambda shape: False)
    monkeypatch.setattr(cupy_backend, "query_packed", lambda shape: False)
    monkeypatch.setattr(cupy_backend, "query_pairs", lambda shape: False)
    monkeypatch.setattr(cupy_backend, "input_packed", lambda shape: False)
    monkeypatch.setattr(cupy_backend, "input_pairs", lambda shape: False)


def forward_kernel() -> str:
    """The forward kernel of the last backend_run."""
    return backend_run.made[0].records[0].config.kernel


def input_kernel() -> str:
    """The backward-input kernel of the last backend_run."""
    return backend_run.made[-1].records[-1].config.kernel


def query_kernel() -> str:
    """The backward-query kernel of the last backend_run."""
    return backend_run.made[-1].records[0].config.kernel


def small(case) -> bool:
    """Whether a case runs a packed kernel (its outputs or inputs fit a slot)."""
    shape = check_inputs(*make_case(*case[:7])[:4], *case[5:])
    return any(
        fn(shape)
        for fn in (
            cupy_backend.forward_packed,
            cupy_backend.forward_pairs,
            cupy_backend.query_packed,
            cupy_backend.query_pairs,
            cupy_backend.input_packed,
            cupy_backend.input_pairs,
        )
    )


#: The CASES whose images fit a slot of lr_forward_packed, lr_forward_pairs,
#: lr_backward_query_packed, lr_backward_query_pairs, lr_backward_input_packed or
#: lr_backward_input_pairs.
SMALL_CASES = [c for c in CASES if small(c)]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c))
def test_fp32_tiled_forward_on_small_images_matches_naive(lib, case, tiled_forward):
    """lr_forward, lr_backward_query and lr_backward_input keep working on the images that the
    packed and pairs kernels now take."""
    check_case(lib, case)
    kernels = (forward_kernel(), query_kernel(), input_kernel())
    assert kernels == ("lr_forward", "lr_backward_query", "lr_backward_input")


# ---- lr_forward_packed: several small images per block --------------------------------------
PACKED_CASES = [
    (11, 16, 7, 7, 2, 7, 1, "sqdiff"),  # 8 + 3 images per group: a block with 5 empty slots
    (9, 12, 8, 8, 4, 3, 1, "mul"),  # whole 8 x 8 slots, 8 + 1 images
    pytest.param((10, 9, 8, 13, 3, 5, 2, "absdiff"), marks=pytest.mark.slow),  # 4 x 7 outputs
    (17, 7, 6, 8, 2, 5, 2, "sqdiff"),  # strips of 2 (quads): 3 x 4 outputs, m = 4, ragged
    (8, 19, 5, 6, 2, 3, 1, "sqdiff"),  # m = 10: chunks of 8 + 2 (and 8 + 1), one full block
    (3, 6, 3, 2, 2, 9, 1, "absdiff"),  # images smaller than the window, 3 of 8 slots
]


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c))
def test_packed_forward_matches_naive(lib, case):
    """The packed kernels where they apply (lr_backward_query_packed: outputs <= 8 x 4 strips;
    lr_backward_input_packed: stride 1, K <= 7, whose tiles fit 80 KB; at larger K
    lr_backward_input_pairs)."""
    check_case(lib, case, seed=53)
    assert forward_kernel() == "lr_forward_packed"
    assert query_kernel() == "lr_backward_query_packed"
    K, stride = case[5:7]
    want = "lr_backward_input_packed" if K <= 7 else "lr_backward_input_pairs"
    assert input_kernel() == (want if stride == 1 else "lr_backward_input")


# ---- lr_forward_pairs: two images per block, each in half a tile's rows ------------------------
PAIRS_CASES = [
    pytest.param(
        (3, 8, 14, 14, 2, 7, 1, "sqdiff"), marks=pytest.mark.slow
    ),  # LR-Net-26's stage 3 shape: 2 + 1 images per group
    pytest.param((4, 6, 16, 16, 3, 3, 1, "mul"), marks=pytest.mark.slow),  # whole 16 x 16 slots
    pytest.param(
        (5, 12, 9, 16, 2, 5, 1, "absdiff"), marks=pytest.mark.slow
    ),  # m = 6, a block with one empty slot
    (3, 20, 10, 11, 2, 3, 1, "sqdiff"),  # m = 10: chunks of 8 + 2
    (3, 6, 15, 30, 2, 3, 2, "sqdiff"),  # stride 2 (strips of 2): 8 x 15 outputs
    (3, 6, 15, 16, 2, 3, 2, "absdiff"),  # stride 2, inputs within a slot: lr_backward_input
    pytest.param(
        (3, 4, 8, 12, 2, 9, 1, "absdiff"), marks=pytest.mark.slow
    ),  # K = 9 (strips of 2): 8 x 12 outputs
    pytest.param(
        (3, 4, 6, 8, 2, 13, 1, "mul"), marks=pytest.mark.slow
    ),  # K = 13: images smaller than the window, 58 KB (opt-in)
]


@pytest.mark.parametrize("case", PAIRS_CASES, ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c))
def test_pairs_forward_matches_naive(lib, case):
    """lr_forward_pairs where the outputs fit a tile's columns and half its rows (four strips)
    but not a slot of lr_forward_packed; lr_backward_input_pairs where the inputs do, at
    stride 1 (its 28-63 KB fit 80 KB at every K); lr_backward_query_pairs where the outputs fit
    one tile of lr_backward_query at stride 1 and K <= 9 (56-64 KB at K = 7 and 9; 126 KB at
    K = 13)."""
    check_case(lib, case, seed=59)
    assert forward_kernel() == "lr_forward_pairs"
    paired_input = case[6] == 1
    assert input_kernel() == ("lr_backward_input_pairs" if paired_input else "lr_backward_input")
    _, _, H, W, _, K, stride, _ = case
    outputs = ((H - 1) // stride + 1, (W - 1) // stride + 1)
    if stride == 1 and K <= 9:
        assert query_kernel() == "lr_backward_query_pairs"
    else:  # (8 x 8 outputs at K = 3: a slot of lr_backward_query_packed)
        packed = max(outputs) <= 8 and K == 3
        assert query_kernel() == ("lr_backward_query_packed" if packed else "lr_backward_query")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "images", "height"), [("packed", 19, 7), ("pairs", 7, 14)]
)  # 3 groups x 3 blocks of 8 images; 3 groups x 4 blocks of 2
def test_slotted_grid_size_does_not_change_results(lib, layout, images, height):
    """The packed and pairs kernels loop over their tiles (8 and 2 images of a group each) like
    lr_forward."""
    x, q, k, geo, gy = make_case(images, 6, height, height, 3, 7, 1, seed=7)
    forward, backward = f"lr_forward_{layout}", f"lr_backward_input_{layout}"
    blocks = 3 * -(-images // (cupy_backend.SLOTS if layout == "packed" else 2))
    base = backend_run(lib, x, q, k, geo, gy, 7, 1, "sqdiff")
    assert forward_kernel() == forward
    assert backend_run.made[0].records[0].config.grid[0] == blocks
    assert input_kernel() == backward
    assert backend_run.made[-1].records[-1].config.grid[0] == blocks
    small = {"grid": (2, 1, 1)}
    two = backend_run(lib, x, q, k, geo, gy, 7, 1, "sqdiff",
                      override={forward: small, backward: small})  # fmt: skip
    for a, b in zip(base[:4], two[:4], strict=True):  # y, grad x, grad q, grad k
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9, 11, 13])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_packed_geometry_mirror_is_the_kernels(lib, kernel_size, stride):
    """cupy_backend.packed_shape, pairs_shape, packed_query_shape, pairs_query_shape,
    packed_input_shape and pairs_input_shape (the launches' dynamic shared memory, the bank
    model) are lr_forward_shape<K, S, LR_SLOTS> and <K, S, LR_PAIR_SLOTS>,
    lr_query_packed_shape<K, S>, lr_query_pairs_shape<K, S> and lr_input_shape<K, 1, LR_SLOTS>
    and <K, 1, LR_PAIR_SLOTS> of the kernels."""
    K, S = kernel_size, stride
    mirrors = [
        (lambda out: lib.lr_host_packed_shape(K, S, out), cupy_backend.packed_shape(K, S)),
        (lambda out: lib.lr_host_pairs_shape(K, S, out), cupy_backend.pairs_shape(K, S)),
    ]
    if S == 1:
        mirrors += [
            (
                lambda out: lib.lr_host_packed_input_shape(K, out),
                cupy_backend.packed_input_shape(K),
            ),
            (lambda out: lib.lr_host_pairs_input_shape(K, out), cupy_backend.pairs_input_shape(K)),
        ]
    out = (ctypes.c_int * 9)()
    for kernels, p in mirrors:
        assert kernels(out) == 0
        assert list(out) == [p.strip, p.slot_rows, p.rows, p.cols, p.pitch, p.slot, p.floats,
                             p.box_rows, p.box_cols]  # fmt: skip
    query = (ctypes.c_int * 10)()
    for kernels, p in [
        (lib.lr_host_packed_query_shape, cupy_backend.packed_query_shape(K, S)),
        (lib.lr_host_pairs_query_shape, cupy_backend.pairs_query_shape(K, S)),
    ]:
        assert kernels(K, S, query) == 0
        assert list(query) == [p.strip, p.slot_rows, p.rows, p.cols, p.pitch, p.slot, p.copy,
                               p.floats, p.box_rows, p.box_cols]  # fmt: skip


@pytest.mark.parametrize("comp", ["sqdiff", "absdiff", "mul"])
def test_fp32_composabilities_ragged_groups(lib, comp):
    check_case(lib, (2, 11, 9, 7, 3, 5, 2, comp), seed=3)  # m = 4, last group holds 3


@pytest.mark.parametrize("comp", ["sqdiff", "absdiff"])
def test_logits_far_below_the_prior_bound_take_the_exact_shift(lib, comp):
    """sqdiff and absdiff start the forward's softmax from the largest prior logit of the group
    (phi <= 0). Where |q - k| is large over a whole window every weight from that bound
    underflows, and the strip runs the exact pass: the results still match the float64 loop.
    Query rows alternate between far and near, so some strips hold one far and one near output.
    """
    B, C, H, W, G, K, s = 2, 6, 9, 7, 2, 5, 1
    x, q, k, geo, gy = make_case(B, C, H, W, G, K, s, seed=29)
    # far: weights near exp(-144) (sqdiff) or exp(-70) (absdiff) from the bound, under the
    # forward's floor of 2^-80 = exp(-55.5); larger offsets lose fp32 digits in the logits alone
    q[:, :, ::2] += {"sqdiff": 12.0, "absdiff": 70.0}[comp]
    got = backend_run(lib, x, q, k, geo, gy, K, s, comp)
    want = naive_results(x, q, k, geo, gy, K, s, comp)
    assert got[0].isfinite().all()
    for name, a, e in zip(NAMES, got, want, strict=True):
        assert_close_rel(a, e, 1e-5, f"{name} ({comp})")


@pytest.mark.parametrize("comp", ["sqdiff", "mul"])
@pytest.mark.parametrize(
    "sizes", [(2, 6, 9, 7, 2, 5, 1), (9, 6, 7, 7, 2, 5, 1)], ids=["tiled", "packed"]
)
def test_large_prior_logits(lib, comp, sizes):
    """Prior logits near 120 (exp overflows fp32 from 88.7): the softmax is shift-invariant, and
    no kernel may form exp of a logit without its output's shift. The backward input's window
    loop reaches outputs beyond the image (staged with lse LR_FAR_KEY, gy 0): only that lse and
    its masks keep their weights (exp(120) = inf, times a zero gy: NaN) out of grad x and grad k.
    On 7 x 7 images the packed kernels run."""
    B, C, H, W, G, K, s = sizes
    x, q, k, geo, gy = make_case(B, C, H, W, G, K, s, seed=31)
    geo += 120.0
    got = backend_run(lib, x, q, k, geo, gy, K, s, comp)
    want = naive_results(x, q, k, geo, gy, K, s, comp)
    for name, a, e in zip(NAMES, got, want, strict=True):
        assert_close_rel(a, e, 1e-5, f"{name} ({comp})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [(2, 7, 8, 7, 3, 3, 1, "sqdiff"), (2, 7, 8, 7, 3, 5, 2, "absdiff"),
     (1, 9, 5, 6, 3, 7, 1, "mul"), (1, 8, 9, 8, 8, 7, 2, "sqdiff")],
    ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c),
)  # fmt: skip
def test_16bit_storage_matches_naive(lib, case, dtype):
    check_case(lib, case, dtype=dtype, tol=1e-2, seed=11)


# ---- every window the op accepts (issue 19, item 1) ----------------------------------------
# K * K > LR_THREADS from K = 13 on: every shared array is loaded with a strided loop. Images of
# at least 7 x 7 put the window's last offsets (beyond the 128th at K = 13) inside the image.
SLOW = pytest.mark.slow
WIDE_CASES = [
    pytest.param((2, 5, 9, 8, 2, 9, 1, "sqdiff"), marks=SLOW),  # m = 3, ragged
    pytest.param((1, 4, 12, 11, 4, 9, 2, "absdiff"), marks=SLOW),  # m = 1
    (1, 6, 14, 13, 2, 9, 3, "mul"),
    pytest.param((1, 7, 8, 9, 3, 11, 1, "absdiff"), marks=SLOW),  # m = 3, last group holds 1
    pytest.param((2, 4, 13, 12, 2, 11, 2, "sqdiff"), marks=SLOW),
    (1, 3, 15, 14, 3, 11, 3, "sqdiff"),  # m = 1
    pytest.param((2, 5, 8, 8, 2, 13, 1, "mul"), marks=SLOW),  # image smaller than the window
    pytest.param((1, 7, 7, 9, 4, 13, 1, "sqdiff"), marks=SLOW),  # m = 2, last group holds 1
    pytest.param((1, 7, 14, 15, 3, 13, 2, "absdiff"), marks=SLOW),
    pytest.param((1, 4, 16, 14, 2, 13, 3, "sqdiff"), marks=SLOW),
]


@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c))
def test_fp32_wide_windows_match_naive(lib, case):
    check_case(lib, case, seed=29)


@pytest.mark.parametrize(
    ("case", "dtype"),
    [((1, 6, 10, 9, 2, 9, 2, "sqdiff"), torch.float16),
     pytest.param((1, 5, 9, 8, 2, 11, 1, "mul"), torch.float16, marks=SLOW),
     ((1, 4, 15, 16, 2, 13, 3, "absdiff"), torch.float16),
     ((1, 6, 13, 12, 3, 9, 3, "absdiff"), torch.bfloat16),
     pytest.param((1, 5, 11, 12, 2, 11, 2, "sqdiff"), torch.bfloat16, marks=SLOW),
     pytest.param((2, 3, 8, 9, 3, 13, 1, "mul"), torch.bfloat16, marks=SLOW)],
    ids=lambda v: str(v).split(".")[-1] if isinstance(v, torch.dtype) else "K{}s{}".format(*v[5:7]),
)  # fmt: skip
def test_16bit_wide_windows_match_naive(lib, case, dtype):
    check_case(lib, case, dtype=dtype, tol=1e-2, seed=31)


@pytest.mark.parametrize("kernel_size", [3, 13])
def test_largest_supported_stride_matches_naive(lib, kernel_size):
    """K = 13 (cupy_backend.MAX_KERNEL_SIZE) and the largest stride whose kernels fit 48 KB of
    static shared memory; the next stride and K = 15 are refused (the automatic backend falls
    back with that reason)."""
    assert cupy_backend.MAX_KERNEL_SIZE == 13
    largest = max(s for s in range(1, 40) if cupy_backend.kernels_fit(kernel_size, s)[0])
    assert largest == {3: 7, 13: 4}[kernel_size]  # built into host_launchers.cpp
    check_case(lib, (1, 3, 9, 8, 2, kernel_size, largest, "sqdiff"), seed=37)
    ok, reason = cupy_backend.kernels_fit(kernel_size, largest + 1)
    assert not ok and "shared memory" in reason and "reference" in reason
    ok, reason = cupy_backend.kernels_fit(15, 1)
    assert not ok and "kernel_size <= 13" in reason


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [(2, 5, 66, 50, 2, 3, 1, "sqdiff"), (2, 4, 130, 66, 2, 5, 2, "mul")],
    ids=lambda c: "B{}C{}H{}W{}G{}K{}s{}-{}".format(*c),
)
def test_images_of_three_by_three_tiles_match_naive(lib, case):
    """Outputs and backward-input positions each span >= 3 x 3 tiles (16 wide, 8 threads x the
    kernel's strip tall), B = 2; in the first case every kernel's tile rows and tile columns
    differ in number (3 x 4 for the backward input's), so a tile decode that swaps them shows."""
    B, _, H, W, _, K, s, _ = case
    assert B >= 2
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    for strip in (cupy_backend.forward_strip(K, s), cupy_backend.query_strip(K, s)):
        assert -(-Ho // (8 * strip)) >= 3 and -(-Wo // 16) >= 3
    in_rows = 8 * cupy_backend.input_strip(K, s)
    assert -(-H // in_rows) >= 3 and -(-W // 16) >= 3
    if case[2:4] == (66, 50):
        assert -(-H // in_rows) != -(-W // 16)
    check_case(lib, case, seed=41)


# ---- NaN in, NaN out, the same on every backend ----------------------------------------------
# Contract: the output is NaN exactly where it depends on a NaN (a NaN q, in-image k or geo logit
# makes the whole softmax of that (b, g, i, j) NaN; a NaN x makes its channel's outputs NaN):
# the same mask on the reference, cpu and cupy backends as on the float64 loop. Gradients: every
# entry the float64 loop makes NaN is NaN on every backend (a NaN is never dropped); a backend may
# add NaN where it multiplies a NaN by a zero weight (an out-of-image neighbour).


@pytest.mark.parametrize("comp", ["sqdiff", "mul"])
@pytest.mark.parametrize("which", ["x", "q", "k", "geo", "gy"])
def test_nan_in_gives_nan_out_on_every_backend(lib, which, comp):
    ok, reason = cpu_backend.cpu_backend_available()
    if not ok:
        pytest.skip(reason)
    K, s = 3, 1
    x, q, k, geo, gy = make_case(1, 4, 6, 7, 2, K, s, seed=43)
    poisoned = {"x": x, "q": q, "k": k, "geo": geo, "gy": gy}[which]
    poisoned.view(-1)[poisoned.numel() // 2 + 1] = float("nan")
    shape = check_inputs(x, q, k, geo, K, s, comp)
    want = [t.isnan() for t in naive_results(x, q, k, geo, gy, K, s, comp)]
    assert want[0].any() or which == "gy"
    runs = {
        "reference": lambda *a: local_relation_reference(*a, shape, comp),
        "cpu": lambda *a: cpu_backend.local_relation_cpu(*a, shape, comp),
        "cupy": lambda *a: cupy_backend.local_relation_cupy(*a, shape, comp, host_factory(lib)),
    }
    for backend, fn in runs.items():
        y, grads = output_and_grads(fn, (x, q, k, geo), gy)
        assert torch.equal(y.isnan(), want[0]), f"{backend}: forward NaN mask"
        for name, g, w in zip(NAMES[1:], grads, want[1:], strict=True):
            assert g.isnan()[w].all(), f"{backend}: grad {name} drops a NaN"


def test_grid_size_does_not_change_results(lib):
    """The kernels loop over tiles, so any grid gives the same numbers (forward and backward
    input exactly; grad geo up to the order of its per-block partial sums)."""
    x, q, k, geo, gy = make_case(2, 6, 19, 17, 2, 3, 1, seed=5)  # several tiles per plane
    base = backend_run(lib, x, q, k, geo, gy, 3, 1, "sqdiff")
    assert backend_run.made[-1].records[0].config.grid[0] > 3
    small = {"grid": (3, 1, 1)}
    override = {"lr_forward": small, "lr_backward_input": small}
    got = backend_run(lib, x, q, k, geo, gy, 3, 1, "sqdiff", override=override)
    grids = [r.config.grid for launcher in backend_run.made for r in launcher.records]
    assert grids[0] == grids[-1] == (3, 1, 1)  # forward, backward input
    for name, a, b in zip(NAMES[:4], got[:4], base[:4], strict=True):
        assert torch.equal(a, b), name
    assert_close_rel(got[4], base[4], 1e-6, "geo")


@pytest.mark.slow
def test_grad_geo_is_bitwise_reproducible(lib):
    """lr_backward_query reduces grad geo in a fixed order (each window row through shared
    memory, then the block's tiles and channel chunks in order, then torch.sum over the blocks):
    repeated runs give the same bits although the emulator interleaves the block's threads and
    its two concurrent blocks differently every time. Two tiles per block."""
    x, q, k, geo, gy = make_case(1, 16, 16, 32, 8, 3, 1, seed=11)
    needs = (False, False, False, True)
    runs = [
        backend_run(lib, x, q, k, geo, gy, 3, 1, "sqdiff", needs=needs, multiprocessors=1)[4]
        for _ in range(3)
    ]
    assert backend_run.made[-1].records[0].config.grid == (16, 1, 1)  # 2 chunks x 8 groups
    want = naive_results(x, q, k, geo, gy, 3, 1, "sqdiff")[4]
    assert_close_rel(runs[0], want, 1e-5, "geo")
    for again in runs[1:]:
        assert torch.equal(again, runs[0])


@pytest.mark.slow
def test_grad_k_is_bitwise_reproducible_on_any_grid(lib):
    """grad k is summed in fixed orders (each tile's key-gradient copies in thread-row order,
    each input's tile partials in tile order), and a tile's partial does not depend on which
    block runs it: repeated runs and backward-query grids of 2 and 4 blocks per group give the
    same bits. 2 x 2 tiles of 16 x 16 outputs per plane, so inputs on the tile seams sum several
    partials."""
    x, q, k, geo, gy = make_case(1, 8, 30, 29, 8, 5, 1, seed=5)
    needs = (False, False, True, False)
    runs = []
    for sms in (1, 1, 1000):
        runs.append(backend_run(lib, x, q, k, geo, gy, 5, 1, "absdiff", needs=needs,
                                multiprocessors=sms)[3])  # fmt: skip
        chunks = backend_run.made[-1].records[0].config.grid[0] // 8
        assert chunks == (2 if sms == 1 else 4)
    want = naive_results(x, q, k, geo, gy, 5, 1, "absdiff")[3]
    assert_close_rel(runs[0], want, 1e-5, "k")
    for again in runs[1:]:
        assert torch.equal(again, runs[0])


@pytest.mark.slow
def test_query_chunking_from_sm_count(lib):
    """The backward-query grid follows the SM count; the results do not."""
    # m = 1; 4 tiles per group (2 images x 2 tiles of 16 x 16 outputs: strips of 2 rows)
    x, q, k, geo, gy = make_case(2, 8, 24, 9, 8, 7, 1, seed=7)
    assert cupy_backend.query_strip(7, 1) == 2
    want = naive_results(x, q, k, geo, gy, 7, 1, "mul")
    shape = check_inputs(x, q, k, geo, 7, 1, "mul")
    seen = set()
    for sms in (1, 1000):
        got = backend_run(lib, x, q, k, geo, gy, 7, 1, "mul", multiprocessors=sms)
        for name, a, e in zip(NAMES, got, want, strict=True):
            assert_close_rel(a, e, 1e-5, f"{name} sms={sms}")
        query = backend_run.made[-1].records[0]
        assert query.config.kernel == "lr_backward_query"
        nchunks = cupy_backend.query_chunks(shape, sms)
        assert nchunks == min(2 * 2, -(-sms * 16 // 8))
        assert query.config.grid == (8 * nchunks, 1, 1)
        seen.add(nchunks)
        again = backend_run(lib, x, q, k, geo, gy, 7, 1, "mul", multiprocessors=sms)
        assert torch.equal(got[4], again[4])  # grad geo is deterministic
    assert seen == {2, 4}


def test_strided_inputs_and_partial_grads(lib):
    x, q, k, geo, gy = make_case(2, 6, 7, 8, 3, 3, 1, seed=17)
    want = naive_results(x, q, k, geo, gy, 3, 1, "sqdiff")
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, q, k, gy)]
    geo_t = geo.transpose(1, 2).contiguous().transpose(1, 2)
    assert not cl[0].is_contiguous() and not geo_t.is_contiguous()
    got = backend_run(lib, *cl[:3], geo_t, cl[3], 3, 1, "sqdiff")
    for name, a, e in zip(NAMES, got, want, strict=True):
        assert_close_rel(a, e, 1e-5, name)
    for needs in [(True, False, False, False), (False, False, False, True)]:
        got = backend_run(lib, x, q, k, geo, gy, 3, 1, "sqdiff", needs)
        for name, a, e, n in zip(NAMES[1:], got[1:], want[1:], needs, strict=True):
            if n:
                assert_close_rel(a, e, 1e-5, f"{name} only")
            else:
                assert a is None
        kernels = [r.config.kernel for r in backend_run.made[-1].records]
        # 7 x 8 images at stride 1: the packed backward kernels
        packed = ["lr_backward_input_packed"] if needs[0] else ["lr_backward_query_packed"]
        assert kernels == packed


def test_mixed_dtypes_and_refusals(lib):
    x, q, k, geo, gy = make_case(2, 7, 8, 7, 3, 5, 2, dtype=torch.bfloat16, seed=19)
    geo32 = geo.float()
    got = backend_run(lib, x, q, k, geo32, gy, 5, 2, "mul")
    assert [t.dtype for t in got] == [torch.bfloat16] * 4 + [torch.float32]
    want = naive_results(x, q, k, geo32, gy, 5, 2, "mul")
    for name, a, e in zip(NAMES, got, want, strict=True):
        assert_close_rel(a, e, 1e-2, name)
    x64, q64, k64, geo64, _ = make_case(1, 4, 5, 5, 2, 3, 1, dtype=torch.float64)
    shape = check_inputs(x64, q64, k64, geo64, 3, 1, "sqdiff")
    with pytest.raises(TypeError, match="reference"):
        cupy_backend.local_relation_cupy(x64, q64, k64, geo64, shape, "sqdiff", host_factory(lib))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cupy_backend.local_relation_cupy(x64.float(), q64, k64, geo64, shape, "sqdiff")


def test_empty_batch(lib):
    x, q, k, geo, gy = make_case(0, 6, 5, 5, 2, 3, 1)
    y, gx, _, gk, ggeo = backend_run(lib, x, q, k, geo, gy, 3, 1, "sqdiff")
    assert y.shape == (0, 6, 5, 5) and gx.shape == x.shape and gk.shape == k.shape
    assert torch.equal(ggeo, torch.zeros_like(geo))
    assert backend_run.made[-1].records == []


# ---- the launch checks fire ------------------------------------------------------------------


def _forward_args(dtype=torch.float32):
    # 5 x 17: wider than a slot of lr_forward_packed and lr_forward_pairs, so lr_forward runs
    x, q, k, geo, _ = make_case(1, 4, 5, 17, 2, 3, 1, dtype=dtype)
    shape = check_inputs(x, q, k, geo, 3, 1, "sqdiff")
    y = torch.empty_like(x)
    lse = torch.empty(1, 2, 5, 17)
    sizes = cupy_backend._sizes(shape)
    comp = cupy_backend.np.int32(0)
    return shape, [x, q, k, geo.float(), y, lse, *sizes, comp]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.pop(), "arguments for"),
        (lambda a: a.__setitem__(-1, cupy_backend.np.int64(0)), "packed as int64"),
        (lambda a: a.__setitem__(6, cupy_backend.np.int32(1)), "packed as int32"),
        (lambda a: a.__setitem__(6, 1), "tensors or numpy scalars"),
        (lambda a: a.__setitem__(0, a[0].double()), "float64"),
        (lambda a: a.__setitem__(0, a[0].transpose(2, 3)), "contiguous"),
        (lambda a: a.__setitem__(5, torch.empty(169)), "holds 169 elements, expected 170"),
        (lambda a: a.__setitem__(4, a[0]), "overlaps"),
    ],
)
def test_host_launcher_rejects_what_the_gpu_would(lib, mutate, message):
    shape, args = _forward_args()
    mutate(args)
    launcher = HostLauncher(lib, "float", 3, 1)
    with pytest.raises((LaunchError, TypeError), match=message):
        launcher.launch(cupy_backend.plan_forward(shape), tuple(args))


@pytest.mark.parametrize(
    "change",
    [{"block": (2048, 1, 1)}, {"block": (64, 32, 1)}, {"block": (8, 16, 1)},
     {"grid": (1, 70000, 1)}, {"shared_bytes": cupy_backend.MAX_OPTIN_SHARED + 4},
     {"kernel": "lr_forward_missing"}],
)  # fmt: skip
def test_host_launcher_rejects_bad_geometry(lib, change):
    shape, args = _forward_args()
    launcher = HostLauncher(lib, "float", 3, 1, override={"lr_forward": change})
    with pytest.raises((LaunchError, KeyError)):
        launcher.launch(cupy_backend.plan_forward(shape), tuple(args))


@pytest.mark.parametrize(
    ("usage", "message"),
    [(PtxasUsage(registers=513, stack_frame=0, spill_stores=0, spill_loads=0, shared=756),
      "513 registers x 128 threads"),
     (PtxasUsage(registers=64, stack_frame=0, spill_stores=0, spill_loads=0, shared=49 * 1024),
      "50176 bytes of static")],
)  # fmt: skip
def test_host_launcher_checks_the_ptxas_report(lib, usage, message):
    shape, args = _forward_args()
    fine = PtxasUsage(registers=512, stack_frame=0, spill_stores=0, spill_loads=0, shared=756)
    HostLauncher(lib, "float", 3, 1, usage={"lr_forward": fine}).launch(
        cupy_backend.plan_forward(shape), tuple(args)
    )  # 512 x 128 = 65,536 registers: the limit itself is allowed
    launcher = HostLauncher(lib, "float", 3, 1, usage={"lr_forward": usage})
    with pytest.raises(LaunchError, match=message):
        launcher.launch(cupy_backend.plan_forward(shape), tuple(args))


def test_host_launcher_counts_static_and_dynamic_shared_memory(lib):
    shape, args = _forward_args()
    static = cupy_backend.static_shared_bytes("lr_forward", 3, 1)
    room = {"lr_forward": {"shared_bytes": cupy_backend.MAX_OPTIN_SHARED - static}}
    HostLauncher(lib, "float", 3, 1, override=room).launch(
        cupy_backend.plan_forward(shape), tuple(args)
    )
    over = {"lr_forward": {"shared_bytes": cupy_backend.MAX_OPTIN_SHARED - static + 4}}
    with pytest.raises(LaunchError, match="static"):
        HostLauncher(lib, "float", 3, 1, override=over).launch(
            cupy_backend.plan_forward(shape), tuple(args)
        )


def test_query_grid_must_match_its_chunk_count(lib):
    x, q, k, geo, gy = make_case(1, 4, 5, 9, 2, 3, 1)  # wider than a slot: the pairs kernel
    with pytest.raises(LaunchError, match="G \\* nchunks"):
        backend_run(lib, x, q, k, geo, gy, 3, 1, "sqdiff",
                    override={"lr_backward_query_pairs": {"grid": (1, 1, 1)}})  # fmt: skip
    x, q, k, geo, gy = make_case(1, 4, 5, 17, 2, 3, 1)  # wider than a tile: lr_backward_query
    with pytest.raises(LaunchError, match="G \\* nchunks"):
        backend_run(lib, x, q, k, geo, gy, 3, 1, "sqdiff",
                    override={"lr_backward_query": {"grid": (1, 1, 1)}})  # fmt: skip


def test_not_built_instantiation_is_a_clear_error(lib):
    shape, args = _forward_args()
    with pytest.raises(LaunchError, match="not built"):
        HostLauncher(lib, "lr_half", 9, 3).launch(cupy_backend.plan_forward(shape), tuple(args))


# ---- the 16-bit conversion helpers of kernels/lr_common.cuh ----------------------------------


def _special_floats() -> torch.Tensor:
    """Values that exercise rounding, subnormals, overflow and specials of fp16 and bf16."""
    gen = torch.Generator().manual_seed(0)
    # every fp32 bit pattern near the fp16 boundaries and a random sample of all of them
    edges = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000,
        0x33000000, 0x33000001, 0x337FFFFF, 0x33800000, 0x38800000, 0x387FFFFF,
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000, 0x00000001, 0x007FFFFF,
    ]  # fmt: skip
    near = []
    for e in edges:
        near.extend(range(max(e - 3, 0), min(e + 4, 2**32)))
    halves = torch.arange(0, 2**16, dtype=torch.int64)
    ties = (halves << 13) | (1 << 12)  # exactly half-way between two fp16 mantissas
    ties_bf16 = (halves << 16) | (1 << 15)
    bits = torch.cat(
        [
            torch.tensor(near, dtype=torch.int64),
            ties,
            ties | (1 << 31),
            ties_bf16 & 0xFFFFFFFF,
            torch.randint(0, 2**32, (200_000,), generator=gen, dtype=torch.int64),
        ]
    )
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).contiguous()


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "half"), (torch.bfloat16, "bf16")])
def test_float_to_16bit_matches_torch(lib, dtype, name):
    values = _special_floats()
    out = torch.empty(values.shape, dtype=torch.int16)
    getattr(lib, f"lr_host_float_to_{name}")(
        _ptr(values), _ptr(out), ctypes.c_longlong(values.numel())
    )
    want = values.to(dtype).view(torch.int16)
    got_f = out.view(dtype).float()
    nan = torch.isnan(values)
    assert torch.isnan(got_f[nan]).all()
    assert torch.equal(out[~nan], want[~nan])


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "half"), (torch.bfloat16, "bf16")])
def test_16bit_to_float_matches_torch_for_every_pattern(lib, dtype, name):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out = torch.empty(bits.shape, dtype=torch.float32)
    getattr(lib, f"lr_host_{name}_to_float")(_ptr(bits), _ptr(out), ctypes.c_longlong(bits.numel()))
    want = bits.view(dtype).float()
    nan = torch.isnan(want)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())
