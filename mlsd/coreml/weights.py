"""The weights a package really computes with: every constexpr_* weight (palettized, quantized, sparse)
expanded to a dense tensor, keyed by the op's output name.

Used to rebuild a PyTorch reference with exactly the package's compressed weights, so a palettized
package can be gated against "the source model with the same weights" rather than against the
full-precision source (which k-means changes by design).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlsd.coreml.executor import _to_torch_const
from mlsd.coreml.ops import OPS
from mlsd.coreml.program import load_program


def constexpr_weights(path_or_program: str | Path | Any, function: str | None = None) -> dict[str, torch.Tensor]:
    """{output name: dense tensor} for the top-level constexpr ops of one function."""
    program = load_program(path_or_program, function)
    consts: dict[str, Any] = {}
    dense: dict[str, torch.Tensor] = {}
    for op in program.function.operations:
        if op.op_type == "const":
            consts[op.outputs[0].name] = _to_torch_const(op.outputs[0].val)
        elif op.op_type.startswith("constexpr_"):
            # constexpr inputs are consts by definition (Core ML folds them at load time).
            kwargs = {key: consts[var.name] for key, var in op.inputs.items()}
            value = OPS[op.op_type](**kwargs)
            consts[op.outputs[0].name] = dense[op.outputs[0].name] = torch.as_tensor(value)
    return dense
