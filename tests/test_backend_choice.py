"""Backend choice: automatic, by argument, by environment variable; clear errors."""

from __future__ import annotations

import pytest
import torch
from lr_naive import random_inputs

from robustlr.ops import BACKEND_ENV, dispatch, local_relation, resolve_backend


def test_cpu_tensors_use_the_compiled_cpu_backend(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.device("cpu")) == "cpu"


def test_cuda_tensors_use_cupy_when_importable(monkeypatch):
    from robustlr.ops import cupy_backend

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "cupy_available", lambda: True)
    monkeypatch.setattr(cupy_backend, "kernels_usable", lambda device_index, ctype: True)
    assert resolve_backend(torch.device("cuda", 0)) == "cupy"
    monkeypatch.setattr(dispatch, "cupy_available", lambda: False)
    assert resolve_backend(torch.device("cuda", 0)) == "reference"


def test_environment_variable_and_argument_override(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    monkeypatch.setattr(dispatch, "cupy_available", lambda: True)
    assert resolve_backend(torch.device("cuda", 0)) == "reference"
    assert resolve_backend(torch.device("cuda", 0), "cupy") == "cupy"  # argument wins


def test_forced_cupy_without_cupy_names_the_package(monkeypatch):
    monkeypatch.setattr(dispatch, "cupy_available", lambda: False)
    with pytest.raises(RuntimeError, match="cupy-cuda13x"):
        resolve_backend(torch.device("cuda", 0), "cupy")


def test_forced_cupy_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "cupy_available", lambda: True)
    x, q, k, geo = random_inputs(1, 4, 5, 5, 2, 3, 1)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        local_relation(x, q, k, geo, kernel_size=3, backend="cupy")


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="unknown local relation backend 'triton'"):
        resolve_backend(torch.device("cpu"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kernel_size": 4}, "odd"),
        ({"stride": 0}, "stride"),
        ({"composability": "dot"}, "composability"),
        ({"q": torch.zeros(1, 2, 3, 3, dtype=torch.float64)}, "q must be"),
        ({"geo": torch.zeros(3, 3, 3, dtype=torch.float64)}, "groups do not fit"),
    ],
)
def test_contract_violations_are_clear_errors(change, message):
    x, q, k, geo = random_inputs(1, 4, 5, 5, 2, 3, 1)
    args = {"x": x, "q": q, "k": k, "geo": geo, "kernel_size": 3, **change}
    with pytest.raises(ValueError, match=message):
        local_relation(**args)
