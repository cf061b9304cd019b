"""Static reading of sm_80 / sm_90 SASS (``nvrtc.sass``'s nvdisasm text): instructions, labels and
the innermost loops with their window-pair blocks. benchmarks/roofline.py counts the kernels'
dynamic instructions from these loops; tests/test_kernels_budget.py checks properties of the
window loops (which instructions they hold) with them."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Instr:
    address: int
    op: str  # opcode without modifiers, e.g. FFMA, MUFU, LDS; a vector shared access keeps
    # its width (LDS.64, LDS.128, STS.64, STS.128: 2 and 4 wavefronts per warp request)
    target: str | None  # branch target label


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions (in address order) and the address of every label."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not m:
            continue
        address, body = int(m.group(1), 16), m.group(2).strip()
        if body.startswith("@!PT "):  # never executed (ptxas's padding): an issue slot only
            body = "NOP"
        body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)
        for name in pending:
            labels[name] = address
        pending = []
        target = re.search(r"`?\(?(\.L_x_\d+)", body) if body.startswith("BRA") else None
        parts = body.split()[0].split(".")
        op = parts[0]
        if op in ("LDS", "STS") and ("64" in parts or "128" in parts):
            op += ".128" if "128" in parts else ".64"
        instrs.append(Instr(address, op, target and target.group(1)))
    return instrs, labels


@dataclass(frozen=True)
class Loop:
    """One innermost loop: the ops every iteration runs and the window-pair blocks; ``guarded``
    lists the other blocks a forward branch may skip (also counted in ``every``)."""

    every: Counter
    pairs: list[Counter]
    guarded: list[Counter]


def _inner_loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) address of each innermost loop."""
    loops = [
        (labels[i.target], i.address)
        for i in instrs
        if i.target in labels and labels[i.target] < i.address  # a backward branch closes a loop
    ]
    return [
        lp for lp in loops if not any(o != lp and lp[0] <= o[0] <= o[1] <= lp[1] for o in loops)
    ]


def outside_loops(text: str) -> Counter:
    """Ops of the kernel's code outside its innermost loops (each at most once per pass through
    the code around them), without ptxas's padding and the CUDA runtime's subroutines (64-bit
    division, the slow path of the reciprocal) that follow the kernel."""
    kernel = re.split(r"\n\s*\.weak\s+\$__internal", text)[0]
    instrs, labels = parse_sass(kernel)
    inner = _inner_loops(instrs, labels)
    return Counter(
        i.op for i in instrs if i.op != "NOP" and not any(lo <= i.address <= hi for lo, hi in inner)
    )


def sass_loops(text: str) -> list[Loop]:
    """The innermost loops of a kernel, in address order."""
    instrs, labels = parse_sass(text)
    inner = _inner_loops(instrs, labels)
    result = []
    for lo, hi in sorted(inner):
        body = [i for i in instrs if lo <= i.address <= hi]
        skips = sorted(
            (i.address, labels[i.target])
            for i in body
            if i.target and i.address < labels[i.target] <= hi
        )
        outer = [
            r for r in skips if not any(o != r and o[0] < r[0] and r[1] <= o[1] for o in skips)
        ]
        pairs, guarded, taken = [], [], set()
        for start, end in outer:
            block = [i for i in body if start < i.address < end]
            ops = Counter(i.op for i in block)
            if ops["MUFU"] == 1 or (ops["FMNMX"] == 1 and not ops["MUFU"]):
                pairs.append(ops)
                taken.update(i.address for i in block)
            elif ops:
                guarded.append(ops)
        every = Counter(i.op for i in body if i.address not in taken)
        result.append(Loop(every, pairs, guarded))
    return result
