"""Reference executor: run a Core ML ML Program with PyTorch ops, on any OS.

It exists to prove packages numerically where Core ML cannot run (Linux CI): same program, same
weights, op semantics from the MIL op documentation. Precision model: every value is computed in
float32 and, with ``fp16_rounding`` (the default), every fp16-typed value is rounded to fp16 at
op boundaries, since Core ML stores fp16 activations between ops. True fp16 arithmetic would
be closer still but is ~300x slower for CPU convolutions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsd.coreml.ops import OPS, torch_dtype
from mlsd.coreml.program import (
    MilExecutorError,
    MilProgram,
    TensorSpec,
    dtype_name,
    load_program,
    tensor_spec,
)

_FLOAT = {"fp16", "fp32", "fp64"}
# Ops that only move, select or compare existing values: fed fp16 values, they output fp16 values,
# so rounding their output again would only cost time.
_VALUE_PRESERVING = frozenset(
    "reshape transpose expand_dims squeeze flatten2d identity slice_by_index slice_by_size concat split stack "
    "gather gather_along_axis gather_nd tile reverse depth_to_space space_to_depth pixel_shuffle pixel_unshuffle "
    "upsample_nearest_neighbor resize_nearest_neighbor crop select maximum minimum relu reduce_max reduce_min "
    "topk band_part".split()
)
_INT = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64"}


class InputMismatchError(MilExecutorError, ValueError):
    """Inputs given to Executor.run do not match the program's inputs."""


class UnsupportedOpError(MilExecutorError, NotImplementedError):
    """The program uses op types the registry has no implementation for (raised at load)."""


class OpFailedError(MilExecutorError, RuntimeError):
    """An op implementation failed or produced a shape the program does not declare."""


def _to_torch_const(val: Any) -> Any:
    """Const payload -> what implementations receive: tensors for rank >= 1, Python scalars otherwise."""
    if isinstance(val, str):
        return val
    arr = np.asarray(val)
    if arr.ndim == 0:
        return arr.item()
    if arr.dtype.kind == "f":
        target = np.float32
    elif arr.dtype in (np.uint16, np.uint32):
        target = np.int64
    else:
        target = arr.dtype
    return torch.from_numpy(np.array(arr, dtype=target))  # one writable copy that torch owns


class _Step:
    """One runtime op with its input bindings resolved at load.

    `static` holds the const inputs, `dynamic` maps input names to value slots, `tuples` holds
    variadic inputs (concat's values) mixing both, `outs` is (slot, dtype, round to fp16, declared
    shape) per output and `free` lists the slots whose last reader is this step.
    """

    __slots__ = ("fn", "static", "dynamic", "tuples", "outs", "op", "free")

    def __init__(self, fn: Any, static: dict, dynamic: list, tuples: list, outs: list, op: Any):
        self.fn = fn
        self.static = static
        self.dynamic = dynamic
        self.tuples = tuples
        self.outs = outs
        self.op = op
        self.free: list[int] = []


def _float_inputs_are_fp16(op: Any) -> bool:
    flat = [v for var in op.inputs.values() for v in (var if isinstance(var, list | tuple) else [var])]
    return all(dtype_name(v) not in ("fp32", "fp64") for v in flat)


def _kind_matches(t: torch.Tensor, dtype: str) -> bool:
    """Float inputs take any float width, int inputs any integer type (Core ML converts those too)."""
    if dtype in _FLOAT:
        return t.is_floating_point()
    if dtype == "bool":
        return t.dtype == torch.bool
    return dtype in _INT and not t.is_floating_point() and t.dtype != torch.bool


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return repr(value)


_ROUND_BLOCK = 1 << 18  # elements: a 512 KB fp16 block stays in cache between its two conversions


def _storages(values: Any) -> set[int]:
    out = set()
    for v in values:
        if isinstance(v, torch.Tensor):
            out.add(v.untyped_storage().data_ptr())
        elif isinstance(v, tuple):
            out |= _storages(v)
    return out


def round_to_fp16(y: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
    """`y` (float32) rounded to the nearest fp16 value, as float32: Core ML's fp16 op boundary.

    Large outputs are rounded in place, block by block, which is bit-identical to
    ``y.to(float16).to(float32)`` but skips two full-size allocations (attention scores of a 512x512
    UNet are 134 MB each; rounding them was 30 % of a UNet evaluation). Outputs that could alias an
    input or a constant (views, shared storage) get the copying form.
    """
    if y.numel() < _ROUND_BLOCK or y._base is not None or not y.is_contiguous() \
            or y.untyped_storage().data_ptr() in _storages(inputs.values()):
        return y.to(torch.float16).to(torch.float32)
    for block in y.view(-1).split(_ROUND_BLOCK):
        block.copy_(block.to(torch.float16))
    return y


class Executor:
    """Run one function of an ML Program. Build once (weights load here), then `run` many times."""

    def __init__(
        self,
        path_or_program: str | Path | MilProgram | Any,
        function: str | None = None,
        *,
        fp16_rounding: bool = True,
        ops: Mapping[str, Any] | None = None,
    ):
        self.program = load_program(path_or_program, function)
        self.fp16_rounding = fp16_rounding
        self.ops = OPS if ops is None else ops
        missing = self.program.unsupported_ops(self.ops)
        if missing:
            listing = "; ".join(
                f"{t} ({', '.join(repr(n) for n in names[:3])}{', ...' if len(names) > 3 else ''})"
                for t, names in sorted(missing.items())
            )
            raise UnsupportedOpError(
                f"The program uses op types the reference executor cannot run: {listing}",
                where=f"{self.program.path or 'in-memory program'} (function {self.program.function_name!r})",
                fix="add implementations to mlsd.coreml.ops.OPS",
            )
        with torch.inference_mode():
            self._compile()

    @property
    def inputs(self) -> dict[str, TensorSpec]:
        return self.program.inputs

    @property
    def outputs(self) -> dict[str, TensorSpec]:
        return self.program.outputs

    # --- load time: resolve every op's input bindings once, fold consts and constexpr weights.
    def _compile(self) -> None:
        fn = self.program.function
        # Local on purpose: once bound into the steps, folded-away inputs (LUTs, indices) can be freed.
        consts: dict[str, Any] = {}
        slots: dict[str, int] = {name: i for i, name in enumerate(fn.inputs)}
        steps: list[_Step] = []
        last_use: dict[int, int] = {}

        def binding(var: Any) -> tuple[int | None, Any]:
            if var.name in consts:
                return None, consts[var.name]
            return slots[var.name], None

        for op in fn.operations:
            if op.op_type == "const":
                consts[op.outputs[0].name] = _to_torch_const(op.outputs[0].val)
                continue
            static: dict[str, Any] = {}
            dynamic: list[tuple[str, int]] = []
            tuples: list[tuple[str, list[tuple[int | None, Any]]]] = []
            for key, var in op.inputs.items():
                if isinstance(var, list | tuple):
                    items = [binding(v) for v in var]
                    if all(s is None for s, _ in items):
                        static[key] = tuple(v for _, v in items)
                    else:
                        tuples.append((key, items))
                        last_use.update({s: len(steps) for s, _ in items if s is not None})
                else:
                    slot, value = binding(var)
                    if slot is None:
                        static[key] = value
                    else:
                        dynamic.append((key, slot))
                        last_use[slot] = len(steps)
            outs = []
            keeps_fp16 = op.op_type in _VALUE_PRESERVING and _float_inputs_are_fp16(op)
            for var in op.outputs:
                spec = tensor_spec(var)
                rnd = self.fp16_rounding and spec.dtype == "fp16" and not keeps_fp16
                outs.append((var.name, torch_dtype(spec.dtype), rnd, spec.shape))
            step = _Step(self.ops[op.op_type], static, dynamic, tuples, outs, op)
            if not dynamic and not tuples:
                # All inputs known at load (const subgraphs, constexpr_* weights): evaluate once now.
                for (name, *_), value in zip(outs, self._call(step, static), strict=True):
                    consts[name] = value.item() if value.dim() == 0 else value
                continue
            for name, *_ in outs:
                slots[name] = len(slots)
            step.outs = [(slots[name], *rest) for name, *rest in outs]
            steps.append(step)

        keep = {slots[v.name] for v in fn.outputs if v.name in slots}
        for slot, index in last_use.items():
            if slot not in keep:
                steps[index].free.append(slot)
        self._steps = steps
        self._n_slots = len(slots)
        self._input_slots = {name: slots[name] for name in fn.inputs}
        self._output_bindings = [(v.name, *binding(v)) for v in fn.outputs]

    def _call(self, step: _Step, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        outs, op = step.outs, step.op
        try:
            result = step.fn(**kwargs)
        except Exception as exc:
            args = ", ".join(f"{k}={_describe(v)}" for k, v in kwargs.items())
            raise OpFailedError(
                f"MIL op {op.op_type} {op.name!r} failed: {type(exc).__name__}: {exc}",
                where=f"inputs: {args}",
            ) from exc
        results = list(result) if isinstance(result, list | tuple) else [result]
        if len(results) != len(outs):
            raise OpFailedError(
                f"MIL op {op.op_type} {op.name!r} gave {len(results)} outputs, expected {len(outs)}"
            )
        values = []
        for (_, dtype, rnd, shape), y in zip(outs, results, strict=True):
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
            if y.dtype != dtype:
                y = y.to(dtype)
            if rnd:
                y = round_to_fp16(y, kwargs)
            if len(shape) != y.dim() or any(e is not None and e != g for e, g in zip(shape, y.shape)):
                raise OpFailedError(
                    f"MIL op {op.op_type} {op.name!r} produced shape {tuple(y.shape)}, the program declares {shape}"
                )
            values.append(y)
        return values

    # --- run time
    def _bind(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        expected, given = set(self.inputs), set(inputs)
        if expected != given:
            raise InputMismatchError(
                f"Inputs do not match the program: missing {sorted(expected - given)}, unexpected {sorted(given - expected)}",
                where=f"function {self.program.function_name!r}",
                fix=f"pass exactly: {', '.join(f'{n} {s.dtype}{list(s.shape)}' for n, s in self.inputs.items())}",
            )
        bound = {}
        for name, spec in self.inputs.items():
            value = inputs[name]
            t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
            if not _kind_matches(t, spec.dtype):
                raise InputMismatchError(
                    f"Input {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, the program expects {spec.dtype}",
                    where=f"function {self.program.function_name!r}",
                )
            if t.dim() != len(spec.shape) or any(
                e is not None and e != g for e, g in zip(spec.shape, t.shape)
            ):
                raise InputMismatchError(
                    f"Input {name!r} has shape {tuple(t.shape)}, the program expects "
                    f"{tuple('?' if d is None else d for d in spec.shape)}",
                    where=f"function {self.program.function_name!r}",
                )
            t = t.to(torch_dtype(spec.dtype))
            if spec.dtype == "fp16" and self.fp16_rounding:
                t = t.to(torch.float16).to(torch.float32)
            bound[name] = t
        return bound

    def run(self, inputs: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
        """Evaluate the function; outputs keep their declared dtype (fp16 -> float32 without rounding)."""
        env: list[Any] = [None] * self._n_slots
        with torch.inference_mode():
            for name, t in self._bind(inputs).items():
                env[self._input_slots[name]] = t
            for step in self._steps:
                kwargs = dict(step.static)
                for key, slot in step.dynamic:
                    kwargs[key] = env[slot]
                for key, items in step.tuples:
                    kwargs[key] = tuple(value if slot is None else env[slot] for slot, value in items)
                for (slot, *_), value in zip(step.outs, self._call(step, kwargs), strict=True):
                    env[slot] = value
                for slot in step.free:
                    env[slot] = None
            result = {}
            for name, slot, value in self._output_bindings:
                spec = self.outputs[name]
                t = torch.as_tensor(value, dtype=torch_dtype(spec.dtype)) if slot is None else env[slot]
                out = t.numpy().copy()
                if spec.dtype == "fp16" and self.fp16_rounding:
                    out = out.astype(np.float16)
                result[name] = out
        return result

    __call__ = run
