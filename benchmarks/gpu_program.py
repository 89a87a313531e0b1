"""What XLA:GPU made of a program: its memory plan, its kernels, how each attention runs, and a
roofline estimate of its time, read from the compiled executable and its optimised HLO.

XLA:GPU's own cost analysis is empty for a deviceless compile, so the FLOP and byte counts are read
off the optimised HLO here: every kernel (a fusion, a library call, a copy) moves its operands and
result through device memory once, and does the FLOPs of its dots and convolutions (2 × output
elements × contracted size). Loops count their body as many times as their known trip count. The
roofline time of a kernel is the longer of its FLOPs at the target's dense peak and its bytes at the
memory bandwidth; the program's estimate is their sum, a lower bound (launch gaps, collectives and
kernels slower than their roofline come on top).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Iterable

from benchmarks.gpu_targets import GpuTarget
from es3_jax.errors import Es3Error
from es3_jax.nn.attention import lowering_for

GIB = 2**30
# Name scope of es3's attention core (`es3_jax.nn.attention.attend`) in the HLO's op names.
ATTENTION_SCOPE = "/attend/"
# JAX names the operations of a `lax.scan` / `lax.map` body with this scope: after the attention
# core's own scope, it is the core's loop over blocks (a loop around the core, e.g. over frames,
# comes before it).
LOOP_BODY = "while/body/"

_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id"}


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape_text)]


def _first_array(shape_text: str) -> str:
    arrays = _arrays(shape_text)
    return f"{arrays[0][0]}[{','.join(map(str, arrays[0][1]))}]" if arrays else shape_text


def _size(shape_text: str) -> int:
    return sum(_BYTES[t] * math.prod(dims) for t, dims in _arrays(shape_text))


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    rest: str  # operands and attributes

    def attribute(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=([^\s,]+(?:\{{[^}}]*\}})?)", self.rest)
        return m.group(1) if m else None

    def operands(self) -> list[str]:
        head = self.rest.split(")", 1)[0]
        return re.findall(r"%([\w.\-]+)", head)

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.rest)
        return m.group(1) if m else ""


@dataclasses.dataclass
class Kernel:
    """One kernel of the program: what it is, its FLOPs, the bytes it moves, how often it runs."""

    name: str
    kind: str
    shape: str
    flops: float
    bytes: float
    runs: int
    op_name: str

    def seconds(self, target: GpuTarget, dtype: str) -> float:
        return self.runs * max(self.flops / target.peak_flops[dtype], self.bytes / target.memory_bandwidth)


class Hlo:
    """The optimised HLO module of a compiled program, parsed enough to count its kernels."""

    def __init__(self, text: str):
        self.computations: dict[str, list[_Instruction]] = {}
        self.shapes: dict[str, dict[str, str]] = {}
        self.entry = ""
        current = None
        for line in text.splitlines():
            head = _COMPUTATION.match(line)
            if head:
                current = head.group(1)
                self.computations[current] = []
                self.shapes[current] = dict(re.findall(r"([\w.\-]+): ([^,()]+(?:\([^)]*\))?)", head.group(2)))
                if line.startswith("ENTRY"):
                    self.entry = current
                continue
            m = _INSTRUCTION.match(line) if current else None
            if m:
                inst = _Instruction(*m.groups())
                self.computations[current].append(inst)
                self.shapes[current][inst.name] = inst.shape

    def _dot_flops(self, computation: str, inst: _Instruction) -> float:
        shapes = self.shapes[computation]
        operands = inst.operands()
        out = sum(math.prod(d) for _, d in _arrays(inst.shape))
        if inst.opcode == "dot" and operands:
            lhs = _arrays(shapes.get(operands[0], ""))
            dims = inst.attribute("lhs_contracting_dims") or "{}"
            contracted = [int(d) for d in re.findall(r"\d+", dims)]
            return 2.0 * out * math.prod(lhs[0][1][d] for d in contracted) if lhs else 0.0
        if inst.opcode == "convolution" and len(operands) > 1:
            rhs = _arrays(shapes.get(operands[1], ""))
            labels = (inst.attribute("dim_labels") or "").split("_")
            if rhs and len(labels) == 3 and "o" in labels[1]:
                kernel = rhs[0][1]
                return 2.0 * out * math.prod(kernel) / kernel[labels[1].index("o")]
        return 0.0

    def _flops(self, computation: str) -> float:
        total = 0.0
        for inst in self.computations.get(computation, []):
            total += self._dot_flops(computation, inst)
            callee = inst.attribute("calls")
            if inst.opcode == "fusion" and callee:
                total += self._flops(callee.lstrip("%"))
        return total

    def _library_flops(self, computation: str, inst: _Instruction) -> float:
        """FLOPs of a cuBLAS / cuDNN call: a GEMM's from its operands' and result's shapes."""
        target = inst.attribute("custom_call_target") or ""
        shapes = self.shapes[computation]
        ops = [_arrays(shapes.get(o, "")) for o in inst.operands()[:2]]
        if ("gemm" in target or "matmul" in target) and all(ops):
            # The result is a tuple (output, workspace); the output comes first.
            out = _arrays(inst.shape)[0][1]
            dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.rest)
            contracted = [int(d) for d in re.findall(r"\d+", dims.group(1))] if dims else []
            lhs = ops[0][0][1]
            return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracted)
        if "fmha" in target and all(ops):
            # QKᵀ and PV (4·B·H·Nq·Nk·D); the backward recomputes QKᵀ and adds dV, dP, dQ, dK (10·...).
            (_, q), (_, k) = ops[0][0], ops[1][0]
            differ = [i for i in range(len(q)) if q[i] != k[i]] if len(q) == len(k) else []
            keys = k[differ[0]] if differ else max(k)
            return (10.0 if "Backward" in target else 4.0) * math.prod(q) * keys
        return 0.0

    def _fusion_bytes(self, fused: str, fusion: _Instruction) -> float:
        """Bytes a fusion reads and writes: its result, and each operand whole, except an operand
        only sliced (what the slices take) or updated in place (the update)."""
        body = self.computations.get(fused, [])
        users: dict[str, list[_Instruction]] = {}
        for inst in body:
            for o in inst.operands():
                users.setdefault(o, []).append(inst)
        moved = float(_size(fusion.shape))
        for inst in body:
            if inst.opcode != "parameter":
                continue
            uses = users.get(inst.name, [])
            if uses and all(u.opcode in ("slice", "dynamic-slice", "gather") for u in uses):
                moved += sum(_size(u.shape) for u in uses)
            elif uses and all(
                u.opcode == "dynamic-update-slice" and u.operands()[0] == inst.name for u in uses
            ):
                moved += sum(_size(self.shapes[fused].get(u.operands()[1], "")) for u in uses)
                moved -= _size(fusion.shape)  # written in place: only the update is
            else:
                moved += _size(inst.shape)
        return max(moved, 0.0)

    def kernels(self, computation: str | None = None, runs: int = 1) -> list[Kernel]:
        """Every kernel the program launches, loops unrolled by their known trip counts."""
        computation = computation or self.entry
        shapes = self.shapes[computation]
        out: list[Kernel] = []
        for inst in self.computations.get(computation, []):
            if inst.opcode in _FREE:
                continue
            if inst.opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.rest)
                body = (inst.attribute("body") or "").lstrip("%")
                out += self.kernels(body, runs * (int(trips.group(1)) if trips else 1))
                continue
            if inst.opcode in ("call", "conditional", "async-start"):
                for callee in re.findall(
                    r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", inst.rest
                ):
                    out += self.kernels(callee, runs)
                continue
            moved = _size(inst.shape) + sum(_size(shapes.get(o, "")) for o in inst.operands())
            if inst.opcode == "fusion":
                fused = (inst.attribute("calls") or "").lstrip("%")
                flops = self._flops(fused)
                moved = self._fusion_bytes(fused, inst)
                kind = re.search(r'"kind":"([^"]+)"', inst.rest)
                kind = kind.group(1) if kind else (inst.attribute("kind") or "fusion")
            elif inst.opcode == "custom-call":
                flops = self._library_flops(computation, inst)
                kind = (inst.attribute("custom_call_target") or "custom-call").strip('"')
            else:
                flops = self._dot_flops(computation, inst)
                kind = inst.opcode
            out.append(Kernel(inst.name, kind, inst.shape, flops, moved, runs, inst.op_name))
        return out


def attention_report(kernels: Iterable[Kernel]) -> list[dict]:
    """How each attention runs: cuDNN's fused kernel, blocks of logits in a loop (the online softmax
    of `es3_jax.nn.blocked_attention`), or logits materialised whole (one block); by the shape of
    the largest array a kernel of the attention core writes, and whether it runs in the core's loop."""
    fused, sites = 0, {}
    for k in kernels:
        if ATTENTION_SCOPE not in k.op_name and "fmha" not in k.kind:
            continue
        if "fmha" in k.kind:
            fused += k.runs
            continue
        arrays = _arrays(k.shape)
        if not arrays:
            continue
        dtype, dims = max(arrays, key=lambda a: math.prod(a[1]))
        if len(dims) < 3:
            continue
        inside = k.op_name.split(ATTENTION_SCOPE, 1)[-1]
        implementation = "blocked" if LOOP_BODY in inside else "materialised"
        site = sites.setdefault((implementation, dtype, dims), {"runs": 0, "bytes": 0.0})
        site["runs"] += k.runs
        site["bytes"] = _BYTES[dtype] * math.prod(dims)
    report = [
        {
            "implementation": implementation,
            "array": f"{d}[{','.join(map(str, s))}]",
            "mib": v["bytes"] / 2**20,
            "runs": v["runs"],
        }
        for (implementation, d, s), v in sorted(sites.items(), key=lambda kv: -kv[1]["bytes"])
    ]
    if fused:
        report.insert(0, {"implementation": "cudnn fused", "array": "-", "mib": 0.0, "runs": fused})
    return report


@dataclasses.dataclass
class GpuProgram:
    """A program compiled by XLA:GPU for `target`, and what its compiler reported."""

    name: str
    target: GpuTarget
    compiled: object  # jax.stages.Compiled
    compile_s: float
    dtype: str = "bfloat16"

    @property
    def memory(self) -> dict[str, float]:
        """See `memory_plan`."""
        return memory_plan(self.compiled)

    @functools.cached_property
    def kernels(self) -> list[Kernel]:
        """The program's kernels (parsed once: the seed step's HLO is large)."""
        return Hlo(self.compiled.as_text()).kernels()

    def roofline(self, top: int = 5) -> dict:
        """See `roofline`."""
        return roofline(self.kernels, self.target, self.dtype, top)


def memory_plan(compiled) -> dict[str, float]:
    """Per-device GiB of a compiled program (any backend): arguments, outputs, aliased (donated),
    temporaries, and the peak = arguments + outputs − aliased + temporaries."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {
        "argument_gib": m.argument_size_in_bytes / GIB,
        "output_gib": m.output_size_in_bytes / GIB,
        "aliased_gib": m.alias_size_in_bytes / GIB,
        "temp_gib": m.temp_size_in_bytes / GIB,
        "peak_gib": peak / GIB,
    }


def roofline(kernels: list[Kernel], target: GpuTarget, dtype: str, top: int = 5) -> dict:
    """FLOPs, bytes moved and roofline time of `kernels` on `target` computing in `dtype`; the share
    of that time in compute-bound kernels and in the attention core's kernels, and the `top`
    kernels that dominate it."""
    seconds = [(k.seconds(target, dtype), k) for k in kernels]
    total = sum(s for s, _ in seconds) or 1.0

    def share(keep) -> float:
        return sum(s for s, k in seconds if keep(k)) / total

    ranked = sorted(seconds, key=lambda sk: -sk[0])[:top]
    return {
        "tflop": sum(k.flops * k.runs for k in kernels) / 1e12,
        "gib_moved": sum(k.bytes * k.runs for k in kernels) / GIB,
        "kernels": sum(k.runs for k in kernels),
        "roofline_ms": 1e3 * sum(s for s, _ in seconds),
        "compute_bound_share": share(
            lambda k: k.flops / target.peak_flops[dtype] >= k.bytes / target.memory_bandwidth
        ),
        "attention_share": share(lambda k: ATTENTION_SCOPE in k.op_name),
        "top": [
            {
                "kernel": k.name,
                "kind": k.kind,
                "shape": _first_array(k.shape),
                "share": s / total,
                "runs": k.runs,
            }
            for s, k in ranked
        ],
    }


def compile_program(
    name: str,
    lower: Callable[[], object],
    target: GpuTarget,
    dtype: str = "bfloat16",
    options: dict | None = None,
) -> GpuProgram:
    """Compile `lower()`'s program (a `jax.stages.Lowered` for devices of `target`) with XLA:GPU,
    with XLA `options` (e.g. {"xla_gpu_enable_triton_gemm": False}). A program that does not
    compile raises `GpuCompileError` naming it."""
    start = time.perf_counter()
    try:
        with lowering_for("gpu"):
            lowered = lower()
        compiled = lowered.compile(compiler_options=options)
    except Exception as e:  # XLA reports lowering and compiler failures with many exception types
        raise GpuCompileError(f"{name}: does not compile for {target.name}: {e}") from e
    return GpuProgram(name, target, compiled, time.perf_counter() - start, dtype)


class GpuCompileError(Es3Error):
    """A program XLA:GPU could not compile for a target."""
