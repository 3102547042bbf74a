"""Helpers for proving ops and packages with the reference executor (used by the test-suite).

`run_op` evaluates a snippet of MIL built with coremltools' Builder through the executor;
`value_inference` evaluates the same snippet with coremltools' own NumPy value inference, an
independent reference. `compare` gives the PSNR / max-abs-error figures used to gate packages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mlsd.coreml.executor import Executor


def _as_list(out: Any) -> list[Any]:
    return list(out) if isinstance(out, list | tuple) else [out]


def build_program(
    build: Callable[..., Any], inputs: Mapping[str, np.ndarray], opset: Any
) -> tuple[Any, list[str]]:
    """A one-function MIL program whose inputs are placeholders shaped like `inputs` (float32, int32, bool)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    dtypes = {"f": types.fp32, "i": types.int32, "b": types.bool}
    placeholders = {
        k: mb.placeholder(shape=v.shape, dtype=dtypes[v.dtype.kind], allow_rank0_input=True)
        for k, v in inputs.items()
    }
    with Function(placeholders, opset_version=opset) as fn:
        outs = _as_list(build(**fn.inputs))
        fn.set_outputs(outs)
    program = Program()
    program.add_function("main", fn)
    return program, [o.name for o in outs]


def run_op(
    build: Callable[..., Any], inputs: Mapping[str, np.ndarray], opset: Any, **executor_kw: Any
) -> list[np.ndarray]:
    """Outputs, in order, of `build(**placeholders)` run by the executor on `inputs`."""
    program, names = build_program(build, inputs, opset)
    result = Executor(program, **executor_kw).run(dict(inputs))
    return [result[n] for n in names]


def value_inference(build: Callable[..., Any], inputs: Mapping[str, np.ndarray], opset: Any) -> list[Any]:
    """Outputs of `build(**inputs)` over consts, as coremltools infers them (None where it cannot)."""
    from coremltools.converters.mil.mil import Function

    with Function({}, opset_version=opset):
        outs = _as_list(build(**inputs))
        values = []
        for var in outs:
            value = var.val
            if value is None and hasattr(var.op, "materialized_val_inference"):
                value = var.op.materialized_val_inference()  # constexpr_* ops
            values.append(value)
    return values


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB against the reference's peak-to-peak range (inf when identical)."""
    diff = np.asarray(got, np.float64) - np.asarray(ref, np.float64)
    rmse = float(np.sqrt(np.mean(diff**2)))
    return math.inf if rmse == 0 else 20 * math.log10(float(np.ptp(ref)) / rmse)


def compare(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    return {"psnr_db": psnr(got, ref), "max_abs": float(diff.max()), "ref_max_abs": float(np.abs(ref).max())}
