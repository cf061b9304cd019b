"""``local_relation``: the one entry point of the op, choosing a backend (DESIGN.md §1).

The seam between the op and its backends is the table ``BACKEND_TABLE``; each entry is a
``Backend``:

- ``name``: what the argument ``backend=`` and ``$ROBUSTLR_LR_BACKEND`` accept;
- ``supports(device, dtype, qk_dim) -> (ok, reason)``: whether this backend can run such a
  call here (it may probe lazily: import a library, build or load kernels); ``reason`` says
  why not, in words a user can act on;
- ``run(x, q, k, geo, shape, composability) -> y``: the differentiable op (an autograd
  Function), called with arguments already checked by ``contract.check_inputs``;
- ``fits(kernel_size, stride) -> (ok, reason)`` (optional): whether this backend can run that
  window (the cupy kernels stage their tiles in at most 48 KB of static shared memory, so
  large windows and strides go to the next backend);
- ``probe(device, dtype) -> ok`` (optional): a costlier check the automatic choice alone makes
  (the cupy entry compiles one kernel once per device and dtype and, when that fails, logs one
  warning naming what to install); a forced backend is not probed, so its errors surface.

Choice: the argument, else ``$ROBUSTLR_LR_BACKEND``, else ``auto``. ``auto`` walks
``BACKEND_TABLE`` in order and takes the first backend whose ``supports`` says yes: ``cupy``
(CUDA tensors, CuPy importable), ``cpu`` (CPU tensors, qk_dim 1, the compiled kernels build),
``reference`` (always), skipping an entry whose ``probe`` fails. A forced backend whose
``supports`` says no is a ``RuntimeError`` carrying the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from robustlr.ops.contract import LocalRelationShape, check_inputs
from robustlr.ops.reference import local_relation_reference

log = logging.getLogger(__name__)

BACKEND_ENV = "ROBUSTLR_LR_BACKEND"
AUTO = "auto"
_CUPY_INSTALL_HINT = (
    "the 'cupy' local relation backend needs CuPy for your CUDA version: "
    "pip install 'robustlr[cuda13]' (cupy-cuda13x) or 'robustlr[cuda12]' (cupy-cuda12x)"
)

Support = tuple[bool, str]
Runner = Callable[..., torch.Tensor]
Probe = Callable[[torch.device, torch.dtype], bool]


@dataclass(frozen=True)
class Backend:
    """One backend of the op: a name, a capability check, the differentiable function and an
    optional probe made by the automatic choice only."""

    name: str
    supports: Callable[[torch.device, torch.dtype, int], Support]
    run: Runner
    probe: Probe | None = None
    fits: Callable[[int, int], Support] | None = None

    def check(
        self, device: torch.device, dtype: torch.dtype, qk_dim: int, window: tuple[int, int] | None
    ) -> Support:
        """``supports`` and, for a known (kernel_size, stride) window, ``fits``."""
        ok, reason = self.supports(device, dtype, qk_dim)
        if ok and window is not None and self.fits is not None:
            ok, reason = self.fits(*window)
        return ok, reason


def cupy_available() -> bool:
    """True when CuPy imports (it does not need a GPU to import)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _cupy_supports(device: torch.device, dtype: torch.dtype, qk_dim: int) -> Support:
    if device.type != "cuda":
        return False, f"the 'cupy' backend runs on CUDA tensors, got a {device} tensor"
    if qk_dim != 1:
        return False, "the 'cupy' backend supports qk_dim = 1 only"
    if not cupy_available():
        return False, _CUPY_INSTALL_HINT
    return True, ""


def _cupy_probe(device: torch.device, dtype: torch.dtype) -> bool:
    from robustlr.ops import cupy_backend

    ctype = cupy_backend.CTYPE_OF_DTYPE.get(dtype)
    return ctype is None or cupy_backend.kernels_usable(device.index or 0, ctype)


def _cupy_fits(kernel_size: int, stride: int) -> Support:
    from robustlr.ops.cupy_backend import kernels_fit

    return kernels_fit(kernel_size, stride)


def _run_cupy(*args: object) -> torch.Tensor:
    from robustlr.ops.cupy_backend import local_relation_cupy

    return local_relation_cupy(*args)


def _cpu_supports(device: torch.device, dtype: torch.dtype, qk_dim: int) -> Support:
    if device.type != "cpu":
        return False, f"the 'cpu' backend runs on CPU tensors, got a {device} tensor"
    if qk_dim != 1:
        return False, "the 'cpu' backend supports qk_dim = 1 only"
    from robustlr.ops.cpu_backend import cpu_backend_available

    return cpu_backend_available()


def _run_cpu(*args: object) -> torch.Tensor:
    from robustlr.ops.cpu_backend import local_relation_cpu

    return local_relation_cpu(*args)


def _reference_supports(device: torch.device, dtype: torch.dtype, qk_dim: int) -> Support:
    return True, ""


#: Every backend, in the order the automatic choice tries them.
BACKEND_TABLE: tuple[Backend, ...] = (
    Backend("cupy", _cupy_supports, _run_cupy, _cupy_probe, _cupy_fits),
    Backend("cpu", _cpu_supports, _run_cpu),
    Backend("reference", _reference_supports, local_relation_reference),
)
BACKENDS = tuple(b.name for b in BACKEND_TABLE)


def get_backend(name: str) -> Backend:
    """The table entry called ``name`` (ValueError naming the choices when there is none)."""
    for entry in BACKEND_TABLE:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown local relation backend {name!r}; choose from {BACKENDS}")


def resolve_backend(
    device: torch.device,
    backend: str | None = None,
    dtype: torch.dtype = torch.float32,
    qk_dim: int = 1,
    window: tuple[int, int] | None = None,
) -> str:
    """Pick the backend: the argument, else $ROBUSTLR_LR_BACKEND, else automatic.

    Automatic means the first entry of ``BACKEND_TABLE`` that supports the call (and fits
    ``window`` = (kernel_size, stride) when given). A forced backend that cannot run the call
    raises RuntimeError with the reason.
    """
    choice = backend or os.environ.get(BACKEND_ENV) or AUTO
    if choice == AUTO:
        for entry in BACKEND_TABLE:
            ok, reason = entry.check(device, dtype, qk_dim, window)
            if ok and (entry.probe is None or entry.probe(device, dtype)):
                return entry.name
            log.debug("local relation backend %r skipped: %s", entry.name, reason)
        raise RuntimeError("no local relation backend supports this call")  # reference does
    ok, reason = get_backend(choice).check(device, dtype, qk_dim, window)
    if not ok:
        raise RuntimeError(reason)
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
    shape: LocalRelationShape = check_inputs(
        x, q, k, geo, kernel_size, stride, composability, qk_dim
    )
    chosen = resolve_backend(x.device, backend, x.dtype, qk_dim, (kernel_size, stride))
    return get_backend(chosen).run(x, q, k, geo, shape, composability)
