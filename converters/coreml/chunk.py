"""Split a Core ML ML program into n weight-balanced chunks.

Apple's `chunk_mlprogram.py` (now `ct.models.utils.bisect_model`) makes exactly two chunks, cutting at
the first single-output, single-consumer op past half of the `const` ndarray bytes, so the split is
only as even as such an op allows, and it counts no data held by `constexpr_*` ops themselves. Here
any op boundary is a candidate cut (tensors spanning it, skip connections included, become chunk
I/O), every byte on disk is counted, and the cuts are chosen jointly for n chunks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import coremltools as ct
import numpy as np
from coremltools.converters.mil.frontend.milproto.load import load as _milproto_load
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Placeholder, Program, types
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

from mlsd.memory import release_memory

GIB = 1 << 30
_BALANCE = 0.03
# Ops that only reinterpret an original input (the fp16 pass's input casts) are recomputed in every
# chunk that needs them, so chunks read the original inputs rather than a forwarded copy.
_REMATERIALIZE = {"cast"}
_LOWER_FP16 = ["common::add_fp16_cast", "common::const_elimination", "common::cast_optimization"]


def _is_const(op) -> bool:
    return op.op_type == "const" or op.op_type.startswith("constexpr_")


def _input_vars(op) -> list:
    return [x for v in op.inputs.values() for x in (v if isinstance(v, (list, tuple)) else [v])]


def _tensor_bytes(var) -> int:
    val = var.val
    if not isinstance(val, np.ndarray) or val.dtype.kind not in "biuf":
        return 0
    # Sub-byte types (iOS18 uint4/uint6 indices) are held one per numpy byte but bit-packed on disk.
    bits = var.dtype.get_bitwidth() if hasattr(var.dtype, "get_bitwidth") else val.itemsize * 8
    return (val.size * bits + 7) // 8


def _owned_by_constexpr(op) -> bool:
    children = [c for v in op.outputs for c in v.child_ops]
    return bool(children) and all(c.op_type.startswith("constexpr_") for c in children)


def weight_bytes(op) -> int:
    """Bytes of constant data this op stores on disk; summing over a program counts each tensor once.

    A `const` that only feeds `constexpr_*` ops (LUT, packed indices, scales) is charged to its first
    constexpr consumer, so a palettized weight counts as LUT + indices at their bit width.
    """
    if op.op_type == "const":
        return 0 if _owned_by_constexpr(op) else sum(_tensor_bytes(v) for v in op.outputs)
    if op.op_type.startswith("constexpr_"):
        return sum(
            _tensor_bytes(x)
            for x in _input_vars(op)
            if x.op is not None
            and x.op.op_type == "const"
            and _owned_by_constexpr(x.op)
            and x.child_ops[0] is op
        )
    return 0


class _Graph:
    """Top-level ops of `main` split into compute ops (cut candidates) and free ops.

    Free ops (consts, constexprs, casts of original inputs) never cross a boundary: each chunk keeps
    its own copy of those it consumes.
    """

    def __init__(self, block):
        ops = list(block.operations)
        free: set = set()
        for op in ops:
            if op.blocks:
                raise NotImplementedError(f"control flow op {op.name!r} cannot be chunked")
            ins = _input_vars(op)
            if _is_const(op) or (
                op.op_type in _REMATERIALIZE and all(x.op is None or x.op in free for x in ins)
            ):
                free.add(op)
        self.compute = [op for op in ops if op not in free]
        self.pos = {op: i for i, op in enumerate(self.compute)}
        m = len(self.compute)
        self.weights = np.zeros(m, dtype=np.int64)
        self.free_weights: list[tuple[int, list[int]]] = []  # (bytes, consumer positions)
        for op in ops:
            wb = weight_bytes(op) if op in free else 0
            if wb:
                users = self._consumers(op) or [m - 1]
                self.weights[users[0]] += wb
                self.free_weights.append((wb, users))
        outputs = {id(v) for v in block.outputs}
        self.spans: list[tuple[str, int, int]] = []  # (var name, producer pos, last consumer pos)
        for op in self.compute:
            p = self.pos[op]
            for v in op.outputs:
                last = m if id(v) in outputs else max((self.pos[c] for c in v.child_ops), default=p)
                if last > p:
                    self.spans.append((v.name, p, last))

    def _consumers(self, op) -> list[int]:
        seen, stack, users = set(), [op], set()
        while stack:
            for v in stack.pop().outputs:
                for c in v.child_ops:
                    if c in self.pos:
                        users.add(self.pos[c])
                    elif id(c) not in seen:
                        seen.add(id(c))
                        stack.append(c)
        return sorted(users)

    def crossing_counts(self) -> np.ndarray:
        """counts[j] = number of tensors crossing a cut placed after compute op j."""
        diff = np.zeros(len(self.compute) + 1, dtype=np.int64)
        for _, p, last in self.spans:
            diff[p] += 1
            diff[last] -= 1
        return np.cumsum(diff)[:-1]

    def crossing(self, j: int) -> list[str]:
        return [name for name, p, last in self.spans if p <= j < last]

    def chunk_bytes(self, cuts: list[int]) -> list[int]:
        bounds = [-1, *cuts, len(self.compute) - 1]
        # A free op used by several chunks is duplicated into each, so it counts in each.
        return [
            sum(wb for wb, users in self.free_weights if any(a < u <= b for u in users))
            for a, b in zip(bounds[:-1], bounds[1:])
        ]


@dataclass
class ChunkPlan:
    n: int
    cuts: list[int]  # index (among compute ops) of the last op of chunks 0..n-2
    cut_ops: list[str]
    bytes: list[int]
    fractions: list[float]
    crossing: list[list[str]]  # tensors handed from chunk k to chunk k+1 (pass-throughs included)
    total_bytes: int

    @property
    def max_deviation(self) -> float:
        """Largest |chunk - mean| / mean."""
        mean = sum(self.bytes) / self.n
        return max(abs(b - mean) / mean for b in self.bytes) if mean else 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "max_deviation": round(self.max_deviation, 6)}, indent=2)


def _main(program: Program):
    if set(program.functions) != {"main"}:
        raise ValueError("only single-function programs (main) can be chunked")
    return program.functions["main"]


def _best_cuts(prefix: np.ndarray, cross: np.ndarray, n: int, tol: float, cap: int = 1000):
    """DP over candidate cuts near each ideal position: fewest crossing tensors, every chunk within
    `tol` of the mean; chunk deviation only breaks ties. Returns None when infeasible."""
    m, mean = len(prefix), prefix[-1] / n
    tie = 1.0 / (n * (tol + 1.0) + 1.0)  # keeps the summed deviation term below one crossing
    prev_idx, prev_end, cost, back = np.array([-1]), np.array([0.0]), np.array([0.0]), []
    for k in range(1, n + 1):
        if k < n:
            dist = np.abs(prefix[: m - 1] - k * mean)
            idx = np.nonzero(dist <= tol * mean)[0]
            if idx.size > cap:
                idx = np.sort(idx[np.argsort(dist[idx], kind="stable")[:cap]])
            step = cross[idx].astype(np.float64)
        else:
            idx, step = np.array([m - 1]), np.zeros(1)
        if idx.size == 0:
            return None
        dev = np.abs(prefix[idx][None, :] - prev_end[:, None] - mean) / max(mean, 1e-12)
        ok = (idx[None, :] > prev_idx[:, None]) & (dev <= tol + 1e-9)
        total = np.where(ok, cost[:, None] + step[None, :] + tie * dev, np.inf)
        arg = total.argmin(axis=0)
        cost = total[arg, np.arange(idx.size)]
        keep = np.isfinite(cost)
        if not keep.any():
            return None
        back.append((prev_idx, arg[keep]))
        prev_idx, prev_end, cost = idx[keep], prefix[idx[keep]], cost[keep]
    cuts, at = [], 0
    for pidx, arg in reversed(back[1:]):
        at = arg[at]
        cuts.append(int(pidx[at]))
    return cuts[::-1]


def plan_chunks(program: Program, n: int, *, tolerance: float = _BALANCE) -> ChunkPlan:
    """Choose n-1 cuts (program order) balancing weight bytes, then minimising crossing tensors."""
    g = _Graph(_main(program))
    m = len(g.compute)
    if not 1 <= n <= m:
        raise ValueError(f"n must be in [1, {m}], got {n}")
    total = int(g.weights.sum())
    cuts: list[int] = []
    if n > 1:
        prefix, cross = np.cumsum(g.weights).astype(np.float64), g.crossing_counts()
        found = _best_cuts(prefix, cross, n, tolerance)
        if found is None:
            # Lumpy weights (one op holding a big share) can make the target unreachable: find the
            # tightest feasible tolerance instead, then still minimise crossings within it.
            lo, hi = tolerance, float(n)  # at tol = n every ordered cut is feasible
            for _ in range(24):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if _best_cuts(prefix, cross, n, mid) is not None else (mid, hi)
            found = _best_cuts(prefix, cross, n, hi)
        cuts = found
    sizes = g.chunk_bytes(cuts)
    return ChunkPlan(
        n=n,
        cuts=cuts,
        cut_ops=[g.compute[j].name for j in cuts],
        bytes=sizes,
        fractions=[s / max(sum(sizes), 1) for s in sizes],
        crossing=[g.crossing(j) for j in cuts],
        total_bytes=total,
    )


def _carve(program: Program, plan: ChunkPlan, k: int) -> Program:
    """Turn a private copy of the full program into chunk k (mutates `program`)."""
    block = _main(program)
    g = _Graph(block)
    first = g.compute[plan.cuts[k - 1] + 1 if k else 0]
    ins = plan.crossing[k - 1] if k else []
    last = k == plan.n - 1
    outs = [v.name for v in block.outputs] if last else plan.crossing[k]
    by_name = {v.name: v for op in block.operations for v in op.outputs}
    fed: dict[str, object] = {}
    with block:
        for name in ins:
            old = by_name[name]
            old.set_name(f"{name}__upstream")
            # Apple's contract: fp16 tensors travel as fp32 between chunks, cast back on entry.
            half = old.dtype == types.fp16
            fed[name] = Placeholder(old.shape, dtype=types.fp32 if half else old.dtype, name=name).outputs[0]
            block._input_dict[name] = fed[name]
            new = mb.cast(x=fed[name], dtype="fp16", before_op=first, name=f"{name}__fp16") if half else None
            block.replace_uses_of_var_after_op(new and new.op, old, new or fed[name], force_replace=True)
        out_vars = []
        for name in outs:
            v = fed.get(name, by_name.get(name))
            if v is None:
                raise KeyError(f"chunk {k}: output {name!r} not found")
            if not last and name not in fed and v.dtype == types.fp16:
                v.set_name(f"{name}__fp16")
                v = mb.cast(x=v, dtype="fp32", name=name)
            out_vars.append(v)
    block.set_outputs(out_vars)
    PASS_REGISTRY["common::dead_code_elimination"](program)
    keep = {id(v) for v in out_vars}
    block._input_dict = type(block._input_dict)(
        (n_, v) for n_, v in block._input_dict.items() if v.child_ops or id(v) in keep
    )
    block.function_inputs = tuple(block._input_dict.values())
    return program


def load_program(mlmodel: ct.models.MLModel) -> Program:
    spec = mlmodel.get_spec()
    return _milproto_load(spec, spec.specificationVersion, mlmodel.weights_dir)


def program_weight_bytes(program: Program) -> int:
    return sum(weight_bytes(op) for op in _main(program).operations)


def _convert(program: Program, target, passes: list[str], precision=ct.precision.FLOAT32):
    pipeline = ct.PassPipeline([*passes, "common::dead_code_elimination"], pipeline_name="mlsd_chunk")
    return ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=precision,
        pass_pipeline=pipeline,
        skip_model_load=True,
    )


def iter_chunks(
    model: ct.models.MLModel | Program,
    n: int,
    *,
    minimum_target: ct.target | None = None,
    precision: ct.precision = ct.precision.FLOAT16,
    max_chunk_bytes: int = GIB,
    tolerance: float = _BALANCE,
) -> tuple[ChunkPlan, Iterator[ct.models.MLModel]]:
    """Plan n weight-balanced chunks of a converted ML program, then make them one at a time.

    Each chunk is carved from a fresh load of the saved model (carving mutates, and `copy.deepcopy`
    overflows the recursion limit on UNet-sized graphs), so at most one full copy of the weights and
    one chunk are in memory, whatever n is: save each chunk and drop it before asking for the next.
    `model` may also be a pymil Program (e.g. fp32 from `convert_to="milinternal"`): it is first lowered
    to `precision` in one conversion (which mutates it) so every chunk is planned on its on-disk bytes.
    Chunk boundaries are fp32 whatever the compute precision.
    """
    if isinstance(model, Program):
        model = _convert(model, minimum_target, _LOWER_FP16, precision)
    target = minimum_target or ct.target(model.get_spec().specificationVersion)
    plan = plan_chunks(load_program(model), n, tolerance=tolerance)
    release_memory()  # a loaded program is a web of cycles: without a collect it outlives the next load
    too_big = [i for i, b in enumerate(plan.bytes) if b > max_chunk_bytes]
    if too_big:
        need = max(n + 1, math.ceil(plan.total_bytes * (1 + tolerance) / max_chunk_bytes))
        raise ValueError(f"chunks {too_big} exceed {max_chunk_bytes} bytes ({plan.bytes}); try n >= {need}")
    if n == 1:
        return plan, iter([model])

    def chunks() -> Iterator[ct.models.MLModel]:
        for k in range(plan.n):
            # The source was optimised already; a full pipeline per chunk would cost minutes on a real UNet.
            part = _convert(_carve(load_program(model), plan, k), target, [])
            part._mil_program = None  # its weights are in the part's package already
            release_memory()
            yield part

    return plan, chunks()


def split_mlmodel(model: ct.models.MLModel | Program, n: int, **options) -> tuple[list[ct.models.MLModel], ChunkPlan]:
    """All chunks at once (small models, tests); see `iter_chunks` for the options and for big models."""
    plan, chunks = iter_chunks(model, n, **options)
    return list(chunks), plan
