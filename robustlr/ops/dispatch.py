"""``local_relation``: the one entry point of the op, choosing a backend (DESIGN.md §1)."""

from __future__ import annotations

import logging
import os

import torch

from robustlr.ops.contract import check_inputs
from robustlr.ops.reference import local_relation_reference

log = logging.getLogger(__name__)

BACKENDS = ("reference", "cupy")
BACKEND_ENV = "ROBUSTLR_LR_BACKEND"
_CUPY_INSTALL_HINT = (
    "the 'cupy' local relation backend needs CuPy for your CUDA version: "
    "pip install 'robustlr[cuda13]' (cupy-cuda13x) or 'robustlr[cuda12]' (cupy-cuda12x)"
)


def cupy_available() -> bool:
    """True when CuPy imports (it does not need a GPU to import)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Pick the backend: the argument, else $ROBUSTLR_LR_BACKEND, else automatic.

    Automatic means ``cupy`` for CUDA tensors when CuPy is importable, else ``reference``.
    """
    choice = backend or os.environ.get(BACKEND_ENV) or "auto"
    if choice == "auto":
        return "cupy" if device.type == "cuda" and cupy_available() else "reference"
    if choice not in BACKENDS:
        raise ValueError(f"unknown local relation backend {choice!r}; choose from {BACKENDS}")
    if choice == "cupy":
        if not cupy_available():
            raise RuntimeError(_CUPY_INSTALL_HINT)
        if device.type != "cuda":
            raise RuntimeError(f"the 'cupy' backend runs on CUDA tensors, got a {device} tensor")
    return choice


def local_relation(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    geo: torch.Tensor,
    kernel_size: int = 7,
    stride: int = 1,
    composability: str = "sqdiff",
    backend: str | None = None,
    qk_dim: int = 1,
) -> torch.Tensor:
    """Local relation aggregation (Hu et al. 2019), differentiable in x, q, k and geo.

    Channel c uses group c // m with m = ceil(C / G). Output (i, j) aggregates the K x K window
    centred on input (i*s, j*s) with softmax weights over the in-image neighbours of
    phi(q, k) + geo; phi is -(q-k)^2 (sqdiff), -|q-k| (absdiff) or q*k (mul), summed over the
    qk_dim entries of a group when qk_dim > 1 (reference backend only).

    Shape:
        x (B, C, H, W), q (B, G*qk_dim, Ho, Wo), k (B, G*qk_dim, H, W), geo (G, K, K)
        -> (B, C, Ho, Wo) with Ho = (H - 1) // stride + 1, Wo likewise.
    """
    shape = check_inputs(x, q, k, geo, kernel_size, stride, composability, qk_dim)
    chosen = resolve_backend(x.device, backend)
    if chosen == "cupy" and qk_dim != 1:
        if backend == "cupy":
            raise ValueError("the 'cupy' backend supports qk_dim = 1 only")
        log.debug("qk_dim=%d: using the reference backend", qk_dim)
        chosen = "reference"
    if chosen == "cupy":
        from robustlr.ops import cupy_backend

        automatic = (backend or os.environ.get(BACKEND_ENV) or "auto") == "auto"
        ctype = cupy_backend.CTYPE_OF_DTYPE.get(x.dtype)
        if (
            automatic
            and ctype is not None
            and not cupy_backend.kernels_usable(x.device.index or 0, ctype)
        ):
            chosen = "reference"  # kernels_usable logged why, once
    if chosen == "cupy":
        return cupy_backend.local_relation_cupy(x, q, k, geo, shape, composability)
    return local_relation_reference(x, q, k, geo, shape, composability)
