"""The automatic backend probes the CuPy kernels once per (device, dtype) and falls back to the
reference backend with one warning line, never failing mid-training (no GPU needed)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from lr_naive import random_inputs

from robustlr.ops import BACKEND_ENV, cupy_backend, dispatch, local_relation
from robustlr.ops.reference import local_relation_reference


@pytest.fixture
def broken_cupy(monkeypatch):
    """get_kernels fails as it does without NVRTC; the probe cache is fresh."""
    calls = []

    def get_kernels(device_index, ctype, kernel_size, stride):
        calls.append((device_index, ctype, kernel_size, stride))
        raise RuntimeError("libnvrtc.so.13: cannot open shared object file\nmore lines")

    cupy_backend.kernels_usable.cache_clear()
    monkeypatch.setattr(cupy_backend, "get_kernels", get_kernels)
    yield calls
    cupy_backend.kernels_usable.cache_clear()


def test_probe_compiles_once_and_warns_once(broken_cupy, caplog):
    with caplog.at_level(logging.WARNING, logger="robustlr.ops.cupy_backend"):
        for _ in range(3):
            assert not cupy_backend.kernels_usable(0, "float")
        assert not cupy_backend.kernels_usable(0, "lr_half")
    assert broken_cupy == [(0, "float", 3, 1), (0, "lr_half", 3, 1)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)
    assert "cupy-cuda13x[ctk]" in lines[0] and "reference backend" in lines[0]
    assert "libnvrtc.so.13" in lines[0]


def cupy_claims_cpu_tensors(monkeypatch) -> None:
    """The cupy entry of the backend table says yes to CPU tensors (as it does to CUDA ones)."""
    entries = [
        dataclasses.replace(e, supports=lambda d, t, q: (True, "")) if e.name == "cupy" else e
        for e in dispatch.BACKEND_TABLE
    ]
    monkeypatch.setattr(dispatch, "BACKEND_TABLE", tuple(entries))


def test_automatic_choice_falls_back_when_the_probe_fails(broken_cupy, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    cupy_claims_cpu_tensors(monkeypatch)
    chosen = dispatch.resolve_backend(torch.device("cpu"), None, torch.float32, 1)
    assert chosen != "cupy"
    assert broken_cupy == [(0, "float", 3, 1)]
    x, q, k, geo = (t.float() for t in random_inputs(1, 4, 5, 5, 2, 3, 1))
    from robustlr.ops.contract import check_inputs

    want = local_relation_reference(
        x, q, k, geo, check_inputs(x, q, k, geo, 3, 1, "sqdiff"), "sqdiff"
    )
    torch.testing.assert_close(local_relation(x, q, k, geo, kernel_size=3), want)
    assert broken_cupy == [(0, "float", 3, 1)]  # probed once per (device, dtype)


def test_forced_cupy_is_not_probed(broken_cupy, monkeypatch):
    cupy_claims_cpu_tensors(monkeypatch)
    assert dispatch.resolve_backend(torch.device("cpu"), "cupy", torch.float32, 1) == "cupy"
    assert broken_cupy == []  # a forced backend is not probed: its errors surface


def test_windows_beyond_the_shared_memory_limit_fall_back(monkeypatch):
    """K = 13 at stride 5 needs more than 48 KB of static shared memory, K = 15 is past the
    kernels' largest window: the automatic choice skips cupy for them (not for K = 13 at stride
    4), a forced cupy says why, the op itself refuses them."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    entries = [
        dataclasses.replace(e, supports=lambda d, t, q: (True, ""), probe=None)
        if e.name == "cupy"
        else e
        for e in dispatch.BACKEND_TABLE
    ]
    monkeypatch.setattr(dispatch, "BACKEND_TABLE", tuple(entries))
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend(cpu, None, torch.float32, 1, (13, 4)) == "cupy"
    assert dispatch.resolve_backend(cpu, None, torch.float32, 1, (13, 5)) != "cupy"
    assert dispatch.resolve_backend(cpu, None, torch.float32, 1, (15, 1)) != "cupy"
    with pytest.raises(RuntimeError, match="shared memory per block at kernel_size=13, stride=5"):
        dispatch.resolve_backend(cpu, "cupy", torch.float32, 1, (13, 5))
    with pytest.raises(RuntimeError, match="kernel_size <= 13, got 15"):
        dispatch.resolve_backend(cpu, "cupy", torch.float32, 1, (15, 1))
    from robustlr.ops.contract import check_inputs

    for K, s in [(13, 5), (15, 1)]:
        x, q, k, geo = (t.float() for t in random_inputs(1, 2, 3, 3, 1, K, s))
        shape = check_inputs(x, q, k, geo, K, s, "sqdiff")
        with pytest.raises(ValueError, match="'cupy' kernels"):
            cupy_backend.local_relation_cupy(x, q, k, geo, shape, "sqdiff")


def test_every_kernel_name_gets_its_own_compiled_function(monkeypatch):
    """get_kernels (a fake CuPy: no GPU) hands each kernel a plan may launch the function
    compiled for its own name expression (v15's pairs kernels had no field in CupyKernels: the
    eight functions did not fit its six fields, and positions would have mixed them up)."""
    import sys
    import types

    class Function:
        def __init__(self, name):
            self.name, self.attributes = name, {}

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.names = list(name_expressions)

        def get_function(self, name):
            assert name in self.names
            return Function(name)

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("cupy")
    fake.RawModule = RawModule
    fake.cuda = types.SimpleNamespace(Device=Device)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    cupy_backend.get_kernels.cache_clear()
    try:
        kernels = cupy_backend.get_kernels(0, "float", 7, 1)
        for kernel in cupy_backend.KERNEL_NAMES:
            want = cupy_backend.name_expression(kernel, "float", 7, 1)
            assert kernels.by_name(kernel).name == want
    finally:
        cupy_backend.get_kernels.cache_clear()
