"""Exact counts read off optimized HLO: full-tensor memory passes and collectives.

Times on a shared machine are noisy; these counts are not. A *pass* is one read or one write
of an array the size of the input tensor by a top-level operation of the compiled program
(a fusion reads each of its operands once and writes each output once). A fusion operand
that is only sliced counts the slice's share, so taking one example out of a batch is not a
pass. A ``conditional`` counts its cheaper branch, the one that runs in the common case
(jaxbn's centred-variance branch runs only for batches with mean² > 100·var).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["COLLECTIVES", "Passes", "count_collectives", "count_passes"]

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "copy-start",
         "copy-done", "after-all", "partition-id", "replica-id"}


@dataclass(frozen=True)
class Passes:
    """Full-tensor reads and writes, in units of the input tensor's element count."""

    reads: float
    writes: float
    f32_copies: int  # float32 arrays of the tensor's size written by a top-level op

    @property
    def total(self) -> float:
        return self.reads + self.writes


def _numels(type_text: str) -> list[tuple[str, int]]:
    out = []
    for dtype, dims in _SHAPE.findall(type_text):
        out.append((dtype, math.prod(int(d) for d in dims.split(",") if d)))
    return out


def _computations(hlo: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$", line)
        if header:
            name = "ENTRY" if line.startswith("ENTRY") else header.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _operand_names(args: str) -> list[str]:
    depth, current, names = 0, "", []
    for char in args:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                break
            depth -= 1
        if char == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += char
    names.append(current)
    found = []
    for arg in names:
        match = re.search(r"%([\w.\-]+)\s*$", arg.strip())
        if match:
            found.append(match.group(1))
    return found


def _sliced_share(fused: list[str], index: int, numel: int) -> float:
    """The share of parameter ``index`` that a fused computation actually reads."""
    param = None
    for line in fused:
        m = _INSTR.match(line)
        if m and m.group(3) == "parameter" and m.group(4).startswith(f"{index})"):
            param = m.group(1)
    if param is None:
        return 1.0
    return _read_share(fused, param, numel)


def _read_share(fused: list[str], value: str, numel: int) -> float:
    """Follows ``value`` through converts and bitcasts; a slice reads only its output."""
    users = [
        m for line in fused if (m := _INSTR.match(line)) and value in _operand_names(m.group(4))
    ]
    if not users:
        return 1.0
    shares = []
    for user in users:
        if user.group(3) == "slice":
            shares.append(sum(n for _, n in _numels(user.group(2))) / numel)
        elif user.group(3) in ("convert", "bitcast", "copy", "reshape"):
            shares.append(_read_share(fused, user.group(1), numel))
        else:
            return 1.0
    return max(shares)


def count_passes(hlo: str, numel: int) -> Passes:
    """Counts the full-tensor passes of the ENTRY computation of an optimized HLO module."""
    comps = _computations(hlo)
    reads, writes, f32_copies = _count_lines(comps, comps.get("ENTRY", []), numel)
    return Passes(reads=round(reads, 3), writes=writes, f32_copies=f32_copies)


def _count_lines(
    comps: dict[str, list[str]], lines: list[str], numel: int
) -> tuple[float, float, int]:
    sizes: dict[str, list[tuple[str, int]]] = {}
    reads = writes = 0.0
    f32_copies = 0
    for line in lines:
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_text, op, args = m.groups()
        sizes[name] = _numels(type_text)
        if op == "conditional":
            # Only one branch runs: count the cheaper one (jaxbn's centred-variance branch,
            # the dearer one, runs only for batches with mean² > 100·var).
            branches = re.search(r"branch_computations=\{([^}]*)\}", args)
            names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
            counted = [_count_lines(comps, comps.get(b, []), numel) for b in names]
            if counted:
                cheapest = min(counted, key=lambda c: c[0] + c[1])
                reads, writes = reads + cheapest[0], writes + cheapest[1]
                f32_copies += cheapest[2]
            continue
        if op in _FREE:
            continue
        called = re.search(r"calls=%([\w.\-]+)", args)
        fused = comps.get(called.group(1), []) if (op == "fusion" and called) else []
        for index, operand in enumerate(_operand_names(args)):
            if any(n == numel for _, n in sizes.get(operand, [])):
                reads += _sliced_share(fused, index, numel) if fused else 1.0
        for dtype, n in sizes[name]:
            if n == numel:
                writes += 1
                f32_copies += dtype == "f32"
    return reads, writes, f32_copies


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective operations in the ENTRY computation (async start/done pairs count once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for line in _computations(hlo).get("ENTRY", []):
        m = _INSTR.match(line)
        if not m:
            continue
        op = m.group(3)
        base = op.removesuffix("-start")
        if base in counts and not op.endswith("-done"):
            counts[base] += 1
    return counts
