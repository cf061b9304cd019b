"""Static reading of sm_80 / sm_90 SASS (``nvrtc.sass``'s nvdisasm text): instructions, labels,
the innermost loops with their window-pair blocks, and the tree of all loops with the longest
path through each one's own code. benchmarks/roofline.py counts the kernels' dynamic
instructions from these; tests/test_kernels_budget.py checks properties of the window loops
(which instructions they hold) with them."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Instr:
    address: int
    op: str  # opcode without modifiers, e.g. FFMA, MUFU, LDS; a vector shared access keeps
    # its width (LDS.64, LDS.128, STS.64, STS.128: 2 and 4 wavefronts per warp request)
    target: str | None  # branch target label
    guarded: bool = False  # under a predicate (a conditional branch or exit)


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
        guard = re.match(r"^@!?U?P[T0-9]+\s+", body)
        body = body[guard.end() :] if guard else body
        for name in pending:
            labels[name] = address
        pending = []
        target = re.search(r"`?\(?(\.L_x_\d+)", body) if body.startswith("BRA") else None
        parts = body.split()[0].split(".")
        op = parts[0]
        if op in ("LDS", "STS") and ("64" in parts or "128" in parts):
            op += ".128" if "128" in parts else ".64"
        instrs.append(Instr(address, op, target and target.group(1), guard is not None))
    return instrs, labels


@dataclass(frozen=True)
class Loop:
    """One innermost loop: the ops every iteration runs and the window-pair blocks; ``guarded``
    lists the other blocks a forward branch may skip (also counted in ``every``)."""

    every: Counter
    pairs: list[Counter]
    guarded: list[Counter]
    first: int = 0  # address of its first and last instruction
    last: int = 0


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
        result.append(Loop(every, pairs, guarded, lo, hi))
    return result


#: Ops that end a basic block.
_BLOCK_ENDS = ("BRA", "EXIT", "RET", "CALL")


@dataclass(frozen=True)
class LoopNode:
    """One loop of a kernel, or the whole kernel (the root), with the loops directly inside it.

    ``path``: the ops of one pass through its own code (its inner loops left out: a pass enters
    and leaves them), along the longest path (the most instructions, padding left out) that calls
    none of the CUDA runtime's subroutines (the slow paths of 64-bit division and of the
    reciprocal, taken only by operands past 32 bits or denormal). ``ops``: every op in its range,
    inner loops included. ``first``, ``last``: the addresses of its first and last instruction."""

    first: int
    last: int
    path: Counter
    ops: Counter
    children: tuple[LoopNode, ...]

    def walk(self) -> list[LoopNode]:
        """This node and every loop inside it, outer before inner, in address order."""
        return [self, *(node for child in self.children for node in child.walk())]


def _basic_blocks(
    instrs: list[Instr], labels: dict[str, int]
) -> tuple[list[list[Instr]], list[list[int]]]:
    """The basic blocks in address order and each one's successors (by index)."""
    leaders = {instrs[0].address, *labels.values()}
    leaders.update(nxt.address for i, nxt in itertools.pairwise(instrs) if i.op in _BLOCK_ENDS)
    blocks: list[list[Instr]] = []
    for i in instrs:
        if i.address in leaders or not blocks:
            blocks.append([])
        blocks[-1].append(i)
    start = {block[0].address: n for n, block in enumerate(blocks)}
    successors = []
    for n, block in enumerate(blocks):
        last = block[-1]
        out = [start[labels[last.target]]] if last.op == "BRA" else []
        stops = last.op in ("BRA", "EXIT", "RET") and not last.guarded
        if not stops and n + 1 < len(blocks):
            out.append(n + 1)
        successors.append(out)
    return blocks, successors


def loop_tree(text: str) -> LoopNode:
    """The kernel's loops as a tree (the root: the whole kernel, run once per thread), from the
    back edges of its control-flow graph (a loop: the address range from a back edge's target to
    its latest source), each with its longest path (LoopNode). The CUDA runtime's subroutines
    after the kernel, and code no path from the entry reaches (ptxas's trap after the last
    exit), are left out. Raises ValueError where the loops do not nest, or where a loop is
    entered other than at its first block."""
    kernel = re.split(r"\n\s*\.weak\s+\$__internal", text)[0]
    instrs, labels = parse_sass(kernel)
    blocks, successors = _basic_blocks(instrs, labels)
    reached, todo = {0}, [0]
    while todo:
        for s in successors[todo.pop()]:
            if s not in reached:
                reached.add(s)
                todo.append(s)
    latch: dict[int, int] = {}
    for n in reached:
        for s in successors[n]:
            if s <= n:
                latch[s] = max(latch.get(s, n), n)
    ranges = sorted(latch.items())
    for a, b in ranges:
        for c, d in ranges:
            if a < c <= b < d:
                raise ValueError(f"loops at blocks {a}-{b} and {c}-{d} do not nest")
    for n in reached:
        for s in successors[n]:
            for a, b in ranges:
                if a < s <= b and not a <= n <= b:
                    raise ValueError(f"loop at blocks {a}-{b} entered at block {s}")

    def build(first: int, last: int) -> LoopNode:
        inner = [(a, b) for a, b in ranges if first <= a and b <= last and (a, b) != (first, last)]
        kids = [
            r for r in inner if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in inner)
        ]
        head = {a: b for a, b in kids}
        owner = {n: a for a, b in kids for n in range(a, b + 1)}
        best: dict[int, tuple[float, int | None]] = {}  # block: (path length, next block)
        for n in reversed([n for n in range(first, last + 1) if n in reached]):
            if owner.get(n, n) != n:
                continue
            members = range(n, head[n] + 1) if n in head else [n]
            body = [] if n in head else [i for i in blocks[n] if i.op != "NOP"]
            weight = float("-inf") if any(i.op == "CALL" for i in body) else len(body)
            nexts = {owner.get(s, s) for m in members for s in successors[m] if first < s <= last}
            nexts.discard(n)
            if any(s < n for s in nexts):
                raise ValueError(f"a backward edge inside the loop at blocks {first}-{last}")
            tail = max(((best[s][0], s) for s in nexts if s in best), default=(0, None))
            best[n] = (weight + tail[0], tail[1])
        if best[first][0] == float("-inf"):
            raise ValueError(f"every path through blocks {first}-{last} calls a subroutine")
        path, n = Counter(), first
        while n is not None:
            if n not in head:
                path.update(i.op for i in blocks[n] if i.op != "NOP")
            n = best[n][1]
        ops = Counter(i.op for n in range(first, last + 1) for i in blocks[n] if i.op != "NOP")
        return LoopNode(
            blocks[first][0].address,
            blocks[last][-1].address,
            path,
            ops,
            tuple(build(a, b) for a, b in kids),
        )

    return build(0, max(reached))
