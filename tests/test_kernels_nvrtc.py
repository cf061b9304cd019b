"""Every kernel in kernels/ compiles through NVRTC, without a GPU (raw CuPy NVRTC bindings)."""

from __future__ import annotations

import re

import pytest

from robustlr.ops import nvrtc
from robustlr.resources import resource_dir

try:
    import cupy  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip(
        "CuPy is not importable: no NVRTC bindings to compile with", allow_module_level=True
    )

_GLOBAL_TEMPLATE = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")


def test_catalogue_lists_every_kernel_source_and_kernel():
    sources = sorted(p.name for p in resource_dir("kernels").glob("*.cu"))
    assert sources == sorted(nvrtc.KERNEL_CATALOGUE)
    for name in sources:
        found = set(_GLOBAL_TEMPLATE.findall(nvrtc.load_kernel_source(name)))
        assert found == set(nvrtc.KERNEL_CATALOGUE[name]), name


def test_load_kernel_source_inlines_local_headers():
    text = nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE)
    assert '#include "' not in text
    assert "lr_float_to_half_bits" in text
    assert "#pragma once" not in text


# cubins for sm_80 / sm_90 of every dtype are compiled by tests/test_kernels_budget.py
# the 16-bit builds in the slow tier (the ptxas budget builds them too, for sm_80 and sm_90)
@pytest.mark.parametrize("arch", ["compute_80"])
@pytest.mark.parametrize(
    "ctype", [c if c == "float" else pytest.param(c, marks=pytest.mark.slow) for c in nvrtc.CTYPES]
)
def test_all_dtypes_compile(arch, ctype):
    for source in nvrtc.KERNEL_CATALOGUE:
        prog = nvrtc.compile_kernels(ctype, 3, 1, arch, filename=source)
        assert prog.kind == ("cubin" if arch.startswith("sm_") else "ptx")
        assert len(prog.binary) > 1000
        assert len(prog.lowered_names) == len(nvrtc.KERNEL_CATALOGUE[source])
        for expr, lowered in prog.lowered_names.items():
            assert lowered.startswith("_Z"), expr
            if prog.kind == "ptx":
                assert f".entry {lowered}(" in prog.binary.decode(), expr


@pytest.mark.parametrize(
    ("ctype", "K", "s", "arch"),
    [
        pytest.param("float", 9, 3, "compute_80", marks=pytest.mark.slow),
        pytest.param("lr_half", 3, 3, "sm_90", marks=pytest.mark.slow),
    ],
)
def test_kernel_size_and_stride_instantiations_compile(ctype, K, s, arch):
    prog = nvrtc.compile_kernels(ctype, K, s, arch)
    assert set(prog.lowered_names) == {
        nvrtc.name_expression(k, ctype, K, s) for k in nvrtc.KERNEL_NAMES
    }


def test_compile_errors_carry_the_log():
    with pytest.raises(RuntimeError, match="undefined_thing"):
        nvrtc.compile_source("__global__ void f() { undefined_thing(); }", ["f"], "sm_80")


def test_bad_arch_and_ctype_are_rejected():
    with pytest.raises(ValueError, match="arch"):
        nvrtc.compile_source("", [], "hopper")
    with pytest.raises(ValueError, match="storage type"):
        nvrtc.name_expression("lr_forward", "double", 7, 1)


# ---- compile parity with what CuPy really compiles ------------------------------------------


def test_gpu_options_are_what_cupy_adds():
    """CuPy's RawModule path appends -ftz=true and --device-as-default-execution-space to our
    options; the compile-only check must compile with the same (read from the installed CuPy)."""
    import inspect

    from cupy.cuda import compiler

    cache_src = inspect.getsource(compiler._compile_with_cache_cuda)
    nvrtc_src = inspect.getsource(compiler._compile_using_nvrtc_no_warning)
    for option in nvrtc.CUPY_ADDED_OPTIONS:
        assert f"'{option}'" in cache_src + nvrtc_src, option
    assert nvrtc.GPU_OPTIONS == nvrtc.COMPILE_OPTIONS + nvrtc.CUPY_ADDED_OPTIONS
    assert "-ftz=true" in nvrtc.GPU_OPTIONS


@pytest.mark.slow
def test_compile_only_check_flushes_denormals_like_the_gpu_build():
    ptx = nvrtc.compile_kernels("float", 3, 1, "compute_80").binary.decode()
    assert "add.ftz.f32" in ptx  # fp32 arithmetic compiled with flush-to-zero
    plain = nvrtc.compile_source(
        nvrtc.load_kernel_source(nvrtc.KERNEL_SOURCE),
        [nvrtc.name_expression(k, "float", 3, 1) for k in nvrtc.KERNEL_NAMES],
        "compute_80",
        options=nvrtc.COMPILE_OPTIONS,
    ).binary.decode()
    assert "add.ftz.f32" not in plain and "add.f32" in plain  # the difference is real


@pytest.mark.slow
def test_cubin_is_a_whole_elf_image():
    prog = nvrtc.compile_kernels("float", 3, 1, "sm_90")
    assert prog.binary[:4] == b"\x7fELF"
    assert nvrtc.elf_extent(prog.binary) == len(prog.binary)
    with pytest.raises(ValueError, match="ELF"):
        nvrtc.elf_extent(b"not an elf" * 10)


@pytest.mark.slow  # (the budget's default tier parses every fp32 kernel's usage too)
def test_ptxas_usage_parses_every_kernel():
    prog = nvrtc.compile_kernels("float", 3, 1, "sm_80", extra_options=("-Xptxas=-v",))
    usage = nvrtc.ptxas_usage(prog.log)
    assert set(usage) == set(prog.lowered_names.values())
    assert all(u.registers > 0 for u in usage.values())
