"""Run the CuPy backend's kernels on the CPU: g++ builds of kernels/*.cu in the CUDA execution
emulator (cuda_emulator.h), behind the backend's ``Launcher`` seam.

``build_library(variant)`` compiles host_launchers.cpp once per source hash into a cache
directory ($ROBUSTLR_HOST_CACHE, else <tmp>/robustlr-host-shim); the variants are ``plain``,
``asan`` (AddressSanitizer + UndefinedBehaviorSanitizer) and ``tsan`` (ThreadSanitizer). The
sanitizer variants are executables that run a launch script (see ``run_sanitized``) because a
sanitizer runtime cannot be loaded into an uninstrumented Python.

``HostLauncher`` is what ``cupy_backend.local_relation_cupy(..., launcher=...)`` gets in the
tests. At every launch it checks, as the GPU would need them to be:
- the argument count and, per argument, the numpy scalar type that CuPy would pack
  (``cupy_backend.pack_arg``) against the instantiation's C signature as compiled;
- behind every pointer: a CPU tensor of the pointee's dtype, contiguous, holding exactly the
  element count that the kernel's own size arguments give (``EXTENTS``), and no overlap of an
  output with any other buffer (the kernels' ``__restrict__``);
- the grid and block limits of CUDA and the block shape the kernels are written for
  (LR_TILE_W x LR_TILE_H, read from kernels/lr_common.cuh);
- shared memory: the kernel's static arrays (``cupy_backend.static_shared_bytes``, which
  tests/test_kernels_budget.py checks against ptxas) plus the dynamic bytes <= 48 KB;
- given a ptxas report of the instantiation (``usage``, e.g. from ``nvrtc.ptxas_table``):
  registers x threads per block <= 65,536 and ptxas's static shared memory <= 48 KB.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustlr.ops import cupy_backend
from robustlr.ops.nvrtc import PtxasUsage, name_expression
from robustlr.resources import resource_dir

SHIM_DIR = Path(__file__).resolve().parent
KERNEL_DIR = resource_dir("kernels")
KERNEL_FILE = "local_relation.cu"

#: Compiler flags per build variant (all: the host shim's include path and C++17).
VARIANTS = {
    "plain": ["-O0", "-shared", "-fPIC"],
    "asan": [
        "-O0",
        "-g",
        "-DLR_HOST_SMALL",
        "-DLR_HOST_NEGATIVE_CONTROLS",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ],
    "tsan": [
        "-O0",
        "-g",
        "-DLR_HOST_SMALL",
        "-DLR_HOST_NEGATIVE_CONTROLS",
        "-fsanitize=thread",
    ],
}
_COMMON = ["-std=c++17", "-Wall", "-fno-strict-aliasing", "-pthread"]

#: Element count behind each pointer parameter of the kernels, from their size arguments.
EXTENTS = {
    "x": "B*C*H*W",
    "q": "B*G*Ho*Wo",
    "k": "B*G*H*W",
    "geo": "G*K*K",
    "y": "B*C*Ho*Wo",
    "lse": "B*G*Ho*Wo",
    "gy": "B*C*Ho*Wo",
    "gq": "B*G*Ho*Wo",
    "gk_partial": "B*G*key_partials",
    "gk_work": "G*nchunks*key_work",
    "geo_partial": "G*K*K*nchunks",
    "gx": "B*C*H*W",
    "gk": "B*G*H*W",
}
#: The numpy scalar CuPy must receive per C parameter type, and the torch dtype per pointee.
NUMPY_OF_CTYPE = {"long long": np.int64, "int": np.int32, "float": np.float32}
TORCH_OF_POINTEE = {"float": torch.float32, "lr_half": torch.float16, "lr_bf16": torch.bfloat16}
#: CUDA limits (compute capability 8.x / 9.x).
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_STATIC_SHARED = cupy_backend.MAX_STATIC_SHARED
# static + dynamic: the CuPy launcher opts in (max_dynamic_shared_size_bytes) above 48 KB
MAX_SHARED_PER_BLOCK = cupy_backend.MAX_OPTIN_SHARED
MAX_REGISTERS_PER_BLOCK = 65536


class LaunchError(AssertionError):
    """A launch the GPU would reject or mis-execute."""


def _sources() -> list[Path]:
    return sorted([*KERNEL_DIR.glob("*.cu"), *KERNEL_DIR.glob("*.cuh")]) + sorted(
        [*SHIM_DIR.glob("*.h"), *SHIM_DIR.glob("*.cuh"), *SHIM_DIR.glob("*.cpp")]
    )


def _cache_dir() -> Path:
    root = os.environ.get("ROBUSTLR_HOST_CACHE")
    return Path(root) if root else Path(tempfile.gettempdir()) / "robustlr-host-shim"


#: Builds started in the background (``prebuild``), by variant.
_BUILDS: dict[str, Future[Path]] = {}


def prebuild(variants: tuple[str, ...]) -> None:
    """Start building host variants in background threads, so that g++ runs beside the tests
    that come before the emulator's (tests/conftest.py calls it after collection)."""
    if shutil.which("g++") is None:
        return
    pool = ThreadPoolExecutor(max_workers=len(variants), thread_name_prefix="host-build")
    for variant in variants:
        if variant not in _BUILDS:
            _BUILDS[variant] = pool.submit(_build, variant)
    pool.shutdown(wait=False)


def build_library(variant: str = "plain") -> Path:
    """Build (or reuse, keyed by the hash of every source and flag) one host variant; waits
    for a background build of it when ``prebuild`` started one.

    ``plain`` is a shared library for ctypes; the sanitizer variants are executables
    (host_main.cpp) reading launch scripts.
    """
    started = _BUILDS.get(variant)
    return started.result() if started is not None else _build(variant)


def _build(variant: str) -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        raise FileNotFoundError("g++ is not installed")
    flags = _COMMON + VARIANTS[variant]
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(flags).encode())
    version = subprocess.run([gxx, "--version"], capture_output=True, text=True, check=True)
    digest.update(version.stdout.encode())
    name = "liblr_host.so" if variant == "plain" else f"lr_host_{variant}"
    out = _cache_dir() / digest.hexdigest()[:20] / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    main = [] if variant == "plain" else [str(SHIM_DIR / "host_main.cpp")]
    tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
    cmd = [gxx, *flags, f"-I{SHIM_DIR}", f"-I{KERNEL_DIR}"]
    cmd += [str(SHIM_DIR / "host_launchers.cpp"), *main, "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, out)  # atomic: concurrent test sessions never see half a library
    return out


# ---- the kernels' C signatures, from the source -----------------------------------------------

_KERNEL = re.compile(
    r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)", re.S
)


def kernel_parameters(kernel: str, ctype: str) -> list[tuple[str, str]]:
    """(C type, name) of each parameter of ``kernel`` in kernels/local_relation.cu, T = ctype."""
    text = (KERNEL_DIR / KERNEL_FILE).read_text()
    for name, params in _KERNEL.findall(text):
        if name != kernel:
            continue
        out = []
        for param in params.split(","):
            words = param.replace("__restrict__", "").replace("*", " * ").split()
            pname, ctype_words = words[-1], words[:-1]
            c = " ".join(
                "const" if w == "const" else (ctype if w == "T" else w) for w in ctype_words
            )
            out.append((c.replace(" *", "*"), pname))
        return out
    raise KeyError(kernel)


# ---- the launcher ------------------------------------------------------------------------------


@dataclass
class LaunchRecord:
    """What one launch looked like (for tests of the planning)."""

    config: cupy_backend.LaunchConfig
    name: str


class HostLauncher:
    """``cupy_backend.Launcher`` running the kernels in the emulator (plain host build)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        ctype: str,
        kernel_size: int,
        stride: int,
        multiprocessors: int = 2,
        override: dict[str, dict[str, Any]] | None = None,
        usage: dict[str, PtxasUsage] | None = None,
    ) -> None:
        self.lib = lib
        self.ctype = ctype
        self.kernel_size = kernel_size
        self.stride = stride
        self.multiprocessors = multiprocessors
        self.override = override or {}
        self.usage = usage or {}  # ptxas report per kernel name (lr_forward, ...)
        self.records: list[LaunchRecord] = []

    def context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def launch(self, config: cupy_backend.LaunchConfig, args: tuple) -> None:
        config = replace(config, **self.override.get(config.kernel, {}))
        name = name_expression(config.kernel, self.ctype, self.kernel_size, self.stride)
        values, nbytes = check_launch(
            self.lib,
            name,
            config,
            args,
            self.kernel_size,
            self.stride,
            self.usage.get(config.kernel),
        )
        self.records.append(LaunchRecord(config, name))
        grid = (ctypes.c_uint * 3)(*config.grid)
        block = (ctypes.c_uint * 3)(*config.block)
        argv = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        sizes = (ctypes.c_ulonglong * len(values))(*nbytes)
        rc = self.lib.lr_host_launch(
            name.encode(), grid, block, ctypes.c_ulonglong(config.shared_bytes), argv, sizes,
            len(values),
        )  # fmt: skip
        if rc == 3:
            raise LaunchError(f"{name} wrote past the end of an argument")
        if rc != 0:
            raise LaunchError(f"lr_host_launch({name}) returned {rc}")


def check_launch(
    lib: ctypes.CDLL,
    name: str,
    config: cupy_backend.LaunchConfig,
    args: tuple,
    kernel_size: int,
    stride: int,
    usage: PtxasUsage | None = None,
) -> tuple[list[Any], list[int]]:
    """Check one launch as described in the module docstring; return the ctypes values and the
    byte size behind each pointer (0 for scalars)."""
    lib.lr_host_signature.restype = ctypes.c_char_p
    sig = lib.lr_host_signature(name.encode())
    if sig is None:
        raise LaunchError(f"{name} is not built into the host library")
    ctypes_sig = sig.decode().split(",")
    kernel, _, rest = name.partition("<")
    ctype = rest.split(",")[0]
    params = kernel_parameters(kernel, ctype)
    if [c for c, _ in params] != ctypes_sig:
        raise LaunchError(f"{name}: source parameters {params} != compiled {ctypes_sig}")
    if len(args) != len(params):
        raise LaunchError(f"{name}: {len(args)} arguments for {len(params)} parameters")
    _check_geometry(name, config)
    _check_resources(name, config, kernel_size, stride, usage)
    packed = [cupy_backend.pack_arg(a) for a in args]
    sizes = {"K": kernel_size}
    for (c, pname), value in zip(params, packed, strict=True):
        if not c.endswith("*"):
            want = NUMPY_OF_CTYPE[c]
            if type(value) is not want:
                raise LaunchError(f"{name}: {pname} ({c}) packed as {type(value).__name__}")
            sizes[pname] = int(value)
    if "Ho" in sizes:
        sizes["key_partials"] = cupy_backend.key_partials(
            kernel_size, stride, sizes["Ho"], sizes["Wo"]
        )
        sizes["key_work"] = cupy_backend.key_grad_work(kernel_size, stride)
    if "nchunks" in sizes and config.grid[0] != sizes["G"] * sizes["nchunks"]:
        raise LaunchError(f"{name}: grid {config.grid} is not G * nchunks blocks")
    values: list[Any] = []
    nbytes: list[int] = []
    written: list[tuple[str, int, int]] = []
    spans: list[tuple[str, int, int]] = []
    for (c, pname), arg, value in zip(params, args, packed, strict=True):
        if not c.endswith("*"):
            values.append({np.int64: ctypes.c_longlong, np.int32: ctypes.c_int,
                           np.float32: ctypes.c_float}[type(value)](value.item()))  # fmt: skip
            nbytes.append(0)
            continue
        if type(value) is not np.uint64 or not isinstance(arg, torch.Tensor):
            raise LaunchError(f"{name}: pointer {pname} is not a tensor packed as np.uint64")
        pointee = c.removeprefix("const ").removesuffix("*")
        if arg.dtype != TORCH_OF_POINTEE[pointee]:
            raise LaunchError(f"{name}: {pname} is {arg.dtype}, the kernel reads {pointee}")
        if not arg.is_contiguous():
            raise LaunchError(f"{name}: {pname} is not contiguous")
        count = eval(EXTENTS[pname], {"__builtins__": {}}, sizes)  # a fixed table above
        if arg.numel() != count:
            raise LaunchError(f"{name}: {pname} holds {arg.numel()} elements, expected {count}")
        start, size = arg.data_ptr(), arg.numel() * arg.element_size()
        spans.append((pname, start, start + size))
        if not c.startswith("const"):
            written.append((pname, start, start + size))
        values.append(ctypes.c_void_p(start))
        nbytes.append(size)
    for wname, ws, we in written:
        for pname, s, e in spans:
            if pname != wname and s < we and ws < e and we > ws and e > s:
                raise LaunchError(f"{name}: output {wname} overlaps {pname}")
    return values, nbytes


def kernel_block() -> tuple[int, int, int]:
    """The block shape every kernel assumes: (LR_TILE_W, LR_TILE_H, 1) from lr_common.cuh."""
    text = (KERNEL_DIR / "lr_common.cuh").read_text()
    tw = re.search(r"#define LR_TILE_W (\d+)", text)
    th = re.search(r"#define LR_TILE_H (\d+)", text)
    return (int(tw.group(1)), int(th.group(1)), 1)


def _check_geometry(name: str, config: cupy_backend.LaunchConfig) -> None:
    grid, block = config.grid, config.block
    if block != kernel_block():
        raise LaunchError(f"{name}: block {block}, the kernels are written for {kernel_block()}")
    if len(grid) != 3 or len(block) != 3 or min(*grid, *block) < 1:
        raise LaunchError(f"{name}: bad grid {grid} / block {block}")
    for axis in range(3):
        if block[axis] > MAX_BLOCK[axis] or grid[axis] > MAX_GRID[axis]:
            raise LaunchError(f"{name}: grid {grid} / block {block} beyond CUDA's limits")
    if block[0] * block[1] * block[2] > MAX_THREADS_PER_BLOCK:
        raise LaunchError(f"{name}: {block} is more than 1024 threads per block")
    if not 0 <= config.shared_bytes <= MAX_SHARED_PER_BLOCK:
        raise LaunchError(f"{name}: {config.shared_bytes} bytes of dynamic shared memory")


def _check_resources(
    name: str,
    config: cupy_backend.LaunchConfig,
    kernel_size: int,
    stride: int,
    usage: PtxasUsage | None,
) -> None:
    """Shared memory per block and, with a ptxas report, registers per block."""
    threads = config.block[0] * config.block[1] * config.block[2]
    kernel = name.partition("<")[0]
    static = cupy_backend.static_shared_bytes(kernel, kernel_size, stride)
    if usage is not None:
        static = max(static, usage.shared)
        if usage.registers * threads > MAX_REGISTERS_PER_BLOCK:
            raise LaunchError(
                f"{name}: {usage.registers} registers x {threads} threads per block > "
                f"{MAX_REGISTERS_PER_BLOCK}"
            )
    if static > MAX_STATIC_SHARED or static + config.shared_bytes > MAX_SHARED_PER_BLOCK:
        raise LaunchError(
            f"{name}: {static} bytes of static + {config.shared_bytes} of dynamic shared memory "
            f"> {MAX_SHARED_PER_BLOCK}"
        )


def host_factory(lib: ctypes.CDLL, **kwargs: Any):
    """A ``LauncherFactory`` for ``local_relation_cupy`` that keeps every launcher it makes."""
    made: list[HostLauncher] = []

    def factory(device: torch.device, ctype: str, kernel_size: int, stride: int) -> HostLauncher:
        if device.type != "cpu":
            raise LaunchError(f"the host launcher runs CPU tensors, got {device}")
        launcher = HostLauncher(lib, ctype, kernel_size, stride, **kwargs)
        made.append(launcher)
        return launcher

    factory.made = made  # type: ignore[attr-defined]
    return factory


# ---- sanitizer builds: record launches, replay them in an instrumented executable ------------


@dataclass
class ScriptArg:
    """One argument of a scripted launch: a scalar (kind i64 / i32 / f32) or a buffer."""

    kind: str
    value: Any  # int / float, or a contiguous CPU tensor for kind "ptr"


def write_script(directory: Path, launches: list[tuple[str, Any, list[ScriptArg]]]) -> Path:
    """Write a launch script (host_main.cpp's format) and its input buffers into ``directory``.

    ``launches``: (instantiation name, LaunchConfig, arguments). Output buffer n of launch i goes
    to ``directory / f"out{i}_{n}.bin"``.
    """
    lines = []
    for i, (name, config, args) in enumerate(launches):
        lines.append(
            f"launch {name.replace(' ', '')} {' '.join(map(str, config.grid))} "
            f"{' '.join(map(str, config.block))} {config.shared_bytes} {len(args)}"
        )
        for n, arg in enumerate(args):
            if arg.kind == "ptr":
                data = arg.value.contiguous().view(torch.uint8).numpy().tobytes()
                src = directory / f"in{i}_{n}.bin"
                src.write_bytes(data)
                lines.append(f"ptr {len(data)} {src} {directory / f'out{i}_{n}.bin'}")
            else:
                lines.append(f"{arg.kind} {arg.value}")
    script = directory / "launches.txt"
    script.write_text("\n".join(lines) + "\n")
    return script


def run_sanitized(variant: str, script: Path) -> subprocess.CompletedProcess:
    """Replay ``script`` in the ``asan`` or ``tsan`` build; sanitizer reports go to stderr."""
    exe = build_library(variant)
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=66"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=66"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66"
    return subprocess.run(
        [str(exe), str(script)], capture_output=True, text=True, env=env, check=False
    )


class RecordingLauncher(HostLauncher):
    """A HostLauncher that also records each launch (after checking and running it) as a
    script entry, with its buffers as they were before the launch and after it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script: list[tuple[str, Any, list[ScriptArg]]] = []
        self.after: list[list[torch.Tensor | None]] = []

    def launch(self, config: cupy_backend.LaunchConfig, args: tuple) -> None:
        name = name_expression(config.kernel, self.ctype, self.kernel_size, self.stride)
        params = kernel_parameters(config.kernel, self.ctype)
        before = []
        for (c, _), a in zip(params, args, strict=True):
            if c.endswith("*"):
                before.append(ScriptArg("ptr", a.detach().clone()))
            else:
                before.append(ScriptArg({"long long": "i64", "int": "i32"}[c], int(a)))
        super().launch(config, args)
        self.script.append((name, replace(config, **self.override.get(config.kernel, {})), before))
        self.after.append(
            [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
        )
