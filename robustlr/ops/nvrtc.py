"""The CUDA kernel sources of the local relation op: loading, naming, and compile-only checks.

``load_kernel_source`` reads a ``.cu`` file from ``kernels/`` with its local ``#include "..."``
headers inlined, so that the text handed to NVRTC is self-contained (and CuPy's on-disk kernel
cache, which keys on the source text, sees header edits). ``compile_source`` compiles through
the raw NVRTC bindings shipped with CuPy; unlike ``cupy.RawModule`` it needs no GPU and no
driver, so it is what the CPU test suite (and ``robustlr bench``) uses to check that every kernel
instantiation compiles for a given architecture.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from robustlr.resources import kernel_source

log = logging.getLogger(__name__)

#: The source file holding the local relation kernels and the kernel templates it defines,
#: each templated as ``<T, K, STRIDE>``.
KERNEL_SOURCE = "local_relation.cu"
KERNEL_NAMES = ("lr_forward", "lr_backward_query", "lr_backward_input")
#: Kernel names per source file in kernels/ (every ``__global__`` template must be listed).
KERNEL_CATALOGUE: dict[str, tuple[str, ...]] = {KERNEL_SOURCE: KERNEL_NAMES}
#: C++ storage types of the kernels' template parameter T (fp16/bf16 as raw 16-bit tags).
CTYPES = ("float", "lr_half", "lr_bf16")
#: Options shared by every compilation of the kernels (CuPy and the compile-only check).
COMPILE_OPTIONS = ("-std=c++17",)

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


def load_kernel_source(filename: str) -> str:
    """Return ``kernels/<filename>`` with its local ``#include "..."`` files inlined (once each)."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        seen.add(name)
        text = _PRAGMA_ONCE.sub("", kernel_source(name))

        def replace(match: re.Match[str]) -> str:
            header = match.group(1)
            if header in seen:
                return f"// {header}: already included"
            return f"// begin {header}\n{expand(header)}\n// end {header}"

        return _INCLUDE.sub(replace, text)

    return expand(filename)


def name_expression(kernel: str, ctype: str, kernel_size: int, stride: int) -> str:
    """The C++ name of one kernel instantiation, e.g. ``lr_forward<float, 7, 1>``."""
    if ctype not in CTYPES:
        raise ValueError(f"unknown kernel storage type {ctype!r}; expected one of {CTYPES}")
    return f"{kernel}<{ctype}, {int(kernel_size)}, {int(stride)}>"


@dataclass(frozen=True)
class CompiledProgram:
    """Result of a compile-only NVRTC run: the PTX or CUBIN bytes and the lowered names."""

    binary: bytes
    kind: str  # "ptx" for -arch=compute_XX, "cubin" for -arch=sm_XX
    lowered_names: dict[str, str] = field(default_factory=dict)
    log: str = ""


def compile_source(
    source: str,
    name_expressions: list[str] | tuple[str, ...],
    arch: str,
    options: tuple[str, ...] = COMPILE_OPTIONS,
    filename: str = "robustlr_kernel.cu",
) -> CompiledProgram:
    """Compile CUDA ``source`` with NVRTC for ``arch`` (``"sm_90"``, ``"compute_80"``, ...).

    Needs CuPy (for its NVRTC bindings) but no GPU. Raises ``RuntimeError`` with the compiler
    log when compilation fails.
    """
    from cupy.cuda import nvrtc

    if not re.fullmatch(r"(sm|compute)_\d+[a-z]?", arch):
        raise ValueError(f"arch must look like 'sm_90' or 'compute_80', got {arch!r}")
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        for name in name_expressions:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as err:
            raise RuntimeError(
                f"NVRTC failed to compile {filename} for {arch}: {err}\n{nvrtc.getProgramLog(prog)}"
            ) from err
        build_log = nvrtc.getProgramLog(prog)
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in name_expressions}
        if arch.startswith("sm_"):
            binary, kind = nvrtc.getCUBIN(prog), "cubin"
        else:
            binary, kind = nvrtc.getPTX(prog), "ptx"
    finally:
        nvrtc.destroyProgram(prog)
    if isinstance(binary, str):
        binary = binary.encode()
    log.debug("compiled %s for %s: %d bytes of %s", filename, arch, len(binary), kind)
    return CompiledProgram(binary=bytes(binary), kind=kind, lowered_names=lowered, log=build_log)


def compile_kernels(
    ctype: str, kernel_size: int, stride: int, arch: str, filename: str = KERNEL_SOURCE
) -> CompiledProgram:
    """Compile-only check of every kernel of ``filename`` for one (dtype, K, stride) and arch."""
    names = [name_expression(k, ctype, kernel_size, stride) for k in KERNEL_CATALOGUE[filename]]
    return compile_source(load_kernel_source(filename), names, arch, filename=filename)
