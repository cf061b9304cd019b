"""The CUDA kernel sources of the local relation op: loading, naming, and compile-only checks.

``load_kernel_source`` reads a ``.cu`` file from ``kernels/`` with its local ``#include "..."``
headers inlined, so that the text handed to NVRTC is self-contained (and CuPy's on-disk kernel
cache, which keys on the source text, sees header edits). ``compile_source`` compiles through
the raw NVRTC bindings shipped with CuPy; unlike ``cupy.RawModule`` it needs no GPU and no
driver, so it is what the CPU test suite (and ``robustlr bench``) uses to check that every kernel
instantiation compiles for a given architecture.

Compile parity: ``cupy.RawModule`` appends options of its own to ours (CuPy 13/14,
``cupy/cuda/compiler.py``: ``-ftz=true`` in ``_compile_with_cache_cuda`` and
``--device-as-default-execution-space`` when jitify is off, then ``-arch=sm_XX``).
``CUPY_ADDED_OPTIONS`` lists them and ``GPU_OPTIONS`` is what the GPU really compiles; the
compile-only check uses ``GPU_OPTIONS`` so that it compiles (and ptxas reports on) exactly the
code the GPU runs. The host build mirrors ``-ftz=true`` by flushing denormals in MXCSR.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from robustlr.resources import kernel_source

log = logging.getLogger(__name__)

#: The source file holding the local relation kernels and the kernel templates it defines,
#: each templated as ``<T, K, STRIDE>``.
KERNEL_SOURCE = "local_relation.cu"
KERNEL_NAMES = (
    "lr_forward",
    "lr_forward_pairs",
    "lr_forward_packed",
    "lr_backward_query",
    "lr_backward_query_pairs",
    "lr_backward_query_packed",
    "lr_backward_input",
    "lr_backward_input_pairs",
    "lr_backward_input_packed",
)
#: Kernel names per source file in kernels/ (every ``__global__`` template must be listed).
KERNEL_CATALOGUE: dict[str, tuple[str, ...]] = {KERNEL_SOURCE: KERNEL_NAMES}
#: C++ storage types of the kernels' template parameter T (fp16/bf16 as raw 16-bit tags).
CTYPES = ("float", "lr_half", "lr_bf16")
#: Options robustlr passes to ``cupy.RawModule`` for the kernels.
COMPILE_OPTIONS = ("-std=c++17",)
#: Options CuPy's RawModule adds to ours before NVRTC runs (besides ``-arch``).
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
#: Everything the GPU compilation passes to NVRTC except ``-arch``.
GPU_OPTIONS = COMPILE_OPTIONS + CUPY_ADDED_OPTIONS

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
    options: tuple[str, ...] = GPU_OPTIONS,
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
            binary, kind = _full_cubin(prog), "cubin"
        else:
            binary, kind = nvrtc.getPTX(prog), "ptx"
    finally:
        nvrtc.destroyProgram(prog)
    if isinstance(binary, str):
        binary = binary.encode()
    log.debug("compiled %s for %s: %d bytes of %s", filename, arch, len(binary), kind)
    return CompiledProgram(binary=bytes(binary), kind=kind, lowered_names=lowered, log=build_log)


def compile_kernels(
    ctype: str,
    kernel_size: int,
    stride: int,
    arch: str,
    filename: str = KERNEL_SOURCE,
    extra_options: tuple[str, ...] = (),
) -> CompiledProgram:
    """Compile-only check of every kernel of ``filename`` for one (dtype, K, stride) and arch.

    ``extra_options`` are appended to ``GPU_OPTIONS``, e.g. ``("-Xptxas=-v",)`` for the ptxas
    resource report (``ptxas_usage``).
    """
    names = [name_expression(k, ctype, kernel_size, stride) for k in KERNEL_CATALOGUE[filename]]
    return compile_source(
        load_kernel_source(filename), names, arch, GPU_OPTIONS + extra_options, filename
    )


def _nvrtc_library() -> ctypes.CDLL:
    """The NVRTC shared library CuPy has loaded (same handle, same program objects)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "libnvrtc.so" in path:
                return ctypes.CDLL(path)
    raise RuntimeError("CuPy's NVRTC library is not loaded in this process")


def _full_cubin(prog: int) -> bytes:
    """The whole CUBIN of a compiled NVRTC program.

    CuPy's ``nvrtc.getCUBIN`` drops the last byte (it treats the buffer like PTX text and strips
    a terminating NUL), which leaves an ELF that nvdisasm and cuobjdump reject; this asks NVRTC
    for the size and the bytes directly.
    """
    lib = _nvrtc_library()
    size = ctypes.c_size_t()
    if lib.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
        raise RuntimeError("nvrtcGetCUBINSize failed")
    buf = ctypes.create_string_buffer(size.value)
    if lib.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) != 0:
        raise RuntimeError("nvrtcGetCUBIN failed")
    return buf.raw


def elf_extent(binary: bytes) -> int:
    """Bytes an ELF64 image needs: the end of its last section or header table."""
    if binary[:4] != b"\x7fELF" or binary[4] != 2:
        raise ValueError("not an ELF64 image")
    phoff, shoff = struct.unpack_from("<QQ", binary, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", binary, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    for n in range(shnum):
        _, sh_type, _, _, sh_offset, sh_size = struct.unpack_from(
            "<IIQQQQ", binary, shoff + n * shentsize
        )
        if sh_type != 8:  # SHT_NOBITS occupies no file bytes
            end = max(end, sh_offset + sh_size)
    return end


@dataclass(frozen=True)
class PtxasUsage:
    """ptxas's resource report for one kernel (``-Xptxas=-v``)."""

    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    shared: int


_PTXAS_FUNC = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_usage(build_log: str) -> dict[str, PtxasUsage]:
    """Parse an NVRTC ``-Xptxas=-v`` log into {lowered kernel name: usage}."""
    usage: dict[str, PtxasUsage] = {}
    blocks = _PTXAS_FUNC.split(build_log)
    for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
        stack = _PTXAS_STACK.search(body)
        regs = _PTXAS_REGS.search(body)
        if stack is None or regs is None:
            raise ValueError(f"no ptxas resource line for {name}")
        smem = _PTXAS_SMEM.search(body)
        usage[name] = PtxasUsage(
            registers=int(regs.group(1)),
            stack_frame=int(stack.group(1)),
            spill_stores=int(stack.group(2)),
            spill_loads=int(stack.group(3)),
            shared=int(smem.group(1)) if smem else 0,
        )
    return usage


@dataclass(frozen=True)
class KernelUsage:
    """ptxas's report for one kernel instantiation on one architecture."""

    kernel: str
    ctype: str
    kernel_size: int
    stride: int
    arch: str
    usage: PtxasUsage


def ptxas_table(
    kernel_sizes: tuple[int, ...] | list[int],
    strides: tuple[int, ...] | list[int],
    archs: tuple[str, ...] | list[str] = ("sm_80", "sm_90"),
    ctypes_: tuple[str, ...] | list[str] = CTYPES,
) -> list[KernelUsage]:
    """Compile every instantiation (one NVRTC program per dtype and arch, with the GPU's
    options and ``-Xptxas=-v``) and return ptxas's resource report for each kernel."""
    source = load_kernel_source(KERNEL_SOURCE)
    rows = []
    for arch in archs:
        for ctype in ctypes_:
            configs = [(k, K, s) for K in kernel_sizes for s in strides for k in KERNEL_NAMES]
            names = [name_expression(k, ctype, K, s) for k, K, s in configs]
            prog = compile_source(source, names, arch, (*GPU_OPTIONS, "-Xptxas=-v"))
            usage = ptxas_usage(prog.log)
            for (kernel, K, s), name in zip(configs, names, strict=True):
                lowered = prog.lowered_names[name]
                rows.append(KernelUsage(kernel, ctype, K, s, arch, usage[lowered]))
    return rows


#: Per-SM limits used by ``occupancy``: registers, threads, blocks, shared memory bytes.
SM_LIMITS = {
    "sm_80": (65536, 2048, 32, 164 * 1024),
    "sm_90": (65536, 2048, 32, 228 * 1024),
}


def occupancy(
    usage: PtxasUsage, arch: str, block_threads: int = 128, dynamic: int = 0
) -> tuple[int, float]:
    """Resident blocks per SM and occupancy (resident threads / max threads) for one kernel
    launched with ``dynamic`` bytes of dynamic shared memory.

    Registers are allocated per warp in units of 256 (i.e. rounded up to 8 per thread); each
    block also reserves 1 KiB of shared memory for the system.
    """
    regs_per_sm, max_threads, max_blocks, smem_per_sm = SM_LIMITS[arch]
    warps = -(-block_threads // 32)
    regs_per_warp = -(-max(usage.registers, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * warps)
    by_smem = smem_per_sm // (usage.shared + dynamic + 1024)
    blocks = min(by_regs, by_smem, max_threads // block_threads, max_blocks)
    return blocks, blocks * block_threads / max_threads


def nvdisasm_path() -> str | None:
    """nvdisasm from PATH or from the triton package that the CUDA build of torch installs."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return str(path) if path.exists() else None


def sass(prog: CompiledProgram, nvdisasm: str) -> str:
    """The SASS text of a CUBIN program (``nvdisasm -c``)."""
    if prog.kind != "cubin":
        raise ValueError("SASS needs a program compiled for an sm_XX architecture")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernels.cubin"
        cubin.write_bytes(prog.binary)
        done = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {done.stderr.strip()}")
    return done.stdout
