"""Kernels and bytes of a compiled XLA:GPU program, read from its optimized HLO text.

Without a GPU `Compiled.cost_analysis()` returns None, so the cost of a compiled program is read
from `Compiled.as_text()`, the scheduled HLO that XLA turns into GPU launches. A launch is an
instruction of a non-fused computation that is not bookkeeping (parameter, constant, tuple,
get-tuple-element, bitcast, control flow): each fusion, custom call (cuBLAS, Triton/Pallas),
copy, sort, ... is one kernel. Control flow is expanded:

  while        with a known trip count (backend_config "known_trip_count": the layer scan) the
               body times the trip count, and no condition: XLA's WhileThunk then runs the body
               alone (xla/backends/gpu/runtime/while_thunk.cc). Without one (the decode loop)
               body + condition per iteration, plus a host sync that no count here shows;
               `analyze` reports one such iteration as `step`.
  conditional  both the branch with the fewest kernels ("low", what greedy sampling runs) and
               the one with the most ("high").
  call         its computation, once.

Bytes of one launch = bytes it reads + bytes it writes, from the operand and result shapes, with
the in-place cases XLA emits counted by what moves, not by buffer size:
  * a fusion parameter read only through (dynamic-)slice / gather counts the slices;
  * a fusion parameter that is operand 0 of a dynamic-update-slice / scatter (an in-place update
    of a donated buffer) is not read, and that result writes only the update;
  * a custom call that declares `bytes_accessed` in its Pallas metadata (kernels/gpu/pallas.py:
    the stacked weights are read one layer in place) counts that; other custom calls count
    every operand and result in full.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s+(ROOT )?%(\S+) = ")
_NAME = re.compile(r"%([\w.\-]+)")
_BOOKKEEPING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
                "copy-done", "fusion-done", "async-done", "iota"}
_CONTROL = {"while", "conditional", "call"}
_SLICES = {"dynamic-slice", "slice", "gather"}
_THROUGH = {"bitcast", "reshape"}


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    args: str = ""  # the operand text as written (a parameter's or constant's literal)


@dataclasses.dataclass
class Computation:
    name: str
    instrs: dict[str, Instr]
    order: list[str]
    root: str


@dataclasses.dataclass
class Kernel:
    """One launch: `count` launches per program run (loop trip counts multiplied in)."""
    name: str
    opcode: str
    shape: str
    bytes: int
    count: int
    target: str  # custom_call_target or fusion kind
    label: str  # Pallas kernel name / fused computation name
    operands: tuple[str, ...] = ()  # operand shapes


@dataclasses.dataclass
class Cost:
    kernels: int = 0
    bytes: int = 0

    def __add__(self, other):
        return Cost(self.kernels + other.kernels, self.bytes + other.bytes)

    def scaled(self, n: int):
        return Cost(self.kernels * n, self.bytes * n)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape text (a tuple counts every element)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """(computations by name, entry name) of an HLO module's text."""
    comps: dict[str, Computation] = {}
    entry, cur = "", None
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            cur = Computation(head.group(2), {}, [], "")
            comps[cur.name] = cur
            if head.group(1):
                entry = cur.name
            continue
        if cur is None:
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        instr = _parse_instr(line[m.end():], m.group(2), bool(m.group(1)))
        cur.instrs[instr.name] = instr
        cur.order.append(instr.name)
        if instr.root:
            cur.root = instr.name
    return comps, entry


def _parse_instr(rest: str, name: str, root: bool) -> Instr:
    if rest.startswith("("):  # a tuple shape: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 2:]
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        i += 1
    args = rest[:i - 1]
    return Instr(name, shape, opcode, _NAME.findall(args), rest[i:], root, args)


def _attr(instr: Instr, key: str) -> list[str]:
    m = re.search(key + r"=\{?([^}\s,]+(?:, %[^}\s,]+)*)\}?", instr.attrs)
    return _NAME.findall(m.group(1)) if m else []


def trip_count(instr: Instr) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
    return int(m.group(1)) if m else None


class Program:
    """A parsed compiled program: its kernels and bytes per run and per decode step."""

    def __init__(self, text: str):
        self.comps, self.entry = parse(text)
        self.kernels: list[Kernel] = []  # every launch, with its per-run count ("low" path)

    # -- public ------------------------------------------------------------------------------

    def analyze(self) -> dict:
        """{"run": (low, high), "step": (low, high) or None}: Cost per program run and per
        iteration of the outermost loop without a known trip count (the decode step)."""
        self.kernels = []
        run = self._walk(self.entry, 1, record=True)
        step_loop = self._step_loop(self.entry)
        step = None
        if step_loop is not None:
            body, cond = _attr(step_loop, "body"), _attr(step_loop, "condition")
            step = tuple(self._walk(body[0], 1, False)[k] + self._walk(cond[0], 1, False)[k]
                         for k in (0, 1))
        return {"run": run, "step": step}

    def loop_kernels(self) -> list[Kernel]:
        """Kernels inside a loop with a known trip count (per-layer work), from the last analyze."""
        return [k for k in self.kernels if k.count > 1]

    # -- walking -----------------------------------------------------------------------------

    def _step_loop(self, comp_name: str) -> Instr | None:
        comp = self.comps[comp_name]
        for name in comp.order:
            ins = comp.instrs[name]
            if ins.opcode == "while" and trip_count(ins) is None:
                return ins
            if ins.opcode == "call":
                for sub in _attr(ins, "to_apply"):
                    found = self._step_loop(sub)
                    if found is not None:
                        return found
        return None

    def _walk(self, comp_name: str, mult: int, record: bool) -> tuple[Cost, Cost]:
        low, high = Cost(), Cost()
        comp = self.comps[comp_name]
        for name in comp.order:
            ins = comp.instrs[name]
            if ins.opcode == "while":
                n = trip_count(ins)
                subs = _attr(ins, "body") + ([] if n else _attr(ins, "condition"))
                n = n or 1
                for sub in subs:
                    lo, hi = self._walk(sub, mult * n, record)
                    low, high = low + lo.scaled(n), high + hi.scaled(n)
            elif ins.opcode == "conditional":
                branches = (_attr(ins, "branch_computations")
                            or _attr(ins, "true_computation") + _attr(ins, "false_computation"))
                costs = [(b, self._walk(b, mult, False)) for b in branches]
                best = min(costs, key=lambda c: (c[1][0].kernels, c[1][0].bytes))
                if record:
                    self._walk(best[0], mult, True)
                low = low + best[1][0]
                high = high + max((c[1][1] for c in costs), key=lambda c: (c.kernels, c.bytes))
            elif ins.opcode == "call":
                for sub in _attr(ins, "to_apply"):
                    lo, hi = self._walk(sub, mult, record)
                    low, high = low + lo, high + hi
            elif ins.opcode not in _BOOKKEEPING:
                b = self._bytes(comp, ins)
                low, high = low + Cost(1, b), high + Cost(1, b)
                if record:
                    self.kernels.append(self._kernel(comp, ins, b, mult))
        return low, high

    def _kernel(self, comp: Computation, ins: Instr, b: int, mult: int) -> Kernel:
        target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
        kind = re.search(r"kind=(\w+)", ins.attrs)
        label = re.search(r'name = \\?"([^"\\]+)\\?"', ins.attrs) or re.search(
            r"calls=%([\w.\-]+)", ins.attrs)
        return Kernel(ins.name, ins.opcode, ins.shape, b, mult,
                      (target or kind).group(1) if (target or kind) else ins.opcode,
                      label.group(1) if label else "",
                      tuple(comp.instrs[o].shape for o in ins.operands if o in comp.instrs))

    # -- bytes -------------------------------------------------------------------------------

    def _bytes(self, comp: Computation, ins: Instr) -> int:
        if ins.opcode == "custom-call":
            declared = _declared_bytes(ins)
            if declared is not None:
                return declared
        if ins.opcode in ("fusion", "fusion-start"):  # an async fusion's start launches it
            called = _attr(ins, "calls")
            if called and called[0] in self.comps:
                return self._fusion_bytes(comp, ins, self.comps[called[0]])
        reads = sum(shape_bytes(comp.instrs[o].shape) for o in ins.operands if o in comp.instrs)
        return reads + shape_bytes(ins.shape)

    def _fusion_bytes(self, outer: Computation, ins: Instr, fused: Computation) -> int:
        """Bytes a fusion reads (parameter by parameter) and writes (its root)."""
        users: dict[str, list[Instr]] = {}
        for i in fused.instrs.values():
            for o in i.operands:
                users.setdefault(o, []).append(i)
        params = {int(i.args): i for i in fused.instrs.values()
                  if i.opcode == "parameter" and i.args.strip().isdigit()}
        total = 0
        for k, operand in enumerate(ins.operands):
            full = shape_bytes(outer.instrs[operand].shape) if operand in outer.instrs else 0
            p = params.get(k)
            total += full if p is None else self._param_read(p, users, full)
        return total + self._written(fused, fused.instrs[fused.root], users)

    def _param_read(self, p: Instr, users: dict, full: int) -> int:
        read, frontier = 0, [p]
        while frontier:
            node = frontier.pop()
            for u in users.get(node.name, []):
                if u.opcode in _THROUGH:
                    frontier.append(u)
                elif u.opcode in _SLICES and u.operands[0] == node.name:
                    read += shape_bytes(u.shape)
                elif u.opcode in ("dynamic-update-slice", "scatter") and u.operands[0] == node.name:
                    # updated in place: the update is counted as written; what later reads the
                    # updated buffer (a slice of it, or all of it) is a read of the parameter
                    frontier.append(u)
                else:
                    return full
        return min(read, full)

    def _written(self, fused: Computation, root: Instr, users: dict) -> int:
        if root.opcode == "tuple":
            return sum(self._written(fused, fused.instrs[o], users) for o in root.operands)
        node = root
        while node.opcode in _THROUGH and node.operands[0] in fused.instrs:
            node = fused.instrs[node.operands[0]]
        if node.opcode == "dynamic-update-slice" and self._from_param(fused, node.operands[0]):
            return shape_bytes(fused.instrs[node.operands[1]].shape)
        if node.opcode == "scatter" and self._from_param(fused, node.operands[0]):
            return shape_bytes(fused.instrs[node.operands[-1]].shape)
        return shape_bytes(root.shape)

    @staticmethod
    def _from_param(fused: Computation, name: str) -> bool:
        node = fused.instrs.get(name)
        while node is not None and node.opcode in _THROUGH:
            node = fused.instrs.get(node.operands[0])
        return node is not None and node.opcode == "parameter"


def _declared_bytes(ins: Instr) -> int | None:
    m = re.search(r'serialized_metadata = "((?:[^"\\]|\\.)*)"', ins.attrs)
    if not m:
        return None
    # MLIR string attributes escape bytes as \XX (hex): \22 is a double quote.
    raw = re.sub(r"\\(\\|[0-9A-Fa-f]{2})",
                 lambda h: "\\" if h.group(1) == "\\" else chr(int(h.group(1), 16)), m.group(1))
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    value = meta.get("bytes_accessed")
    return int(value) if value is not None else None
