"""The op registry: MIL op type -> PyTorch implementation.

Importing the implementation modules fills :data:`OPS`; see :mod:`mlsd.coreml.ops_base` for the
calling convention.
"""

from __future__ import annotations

from mlsd.coreml import ops_const, ops_math, ops_nn, ops_tensor, ops_update  # noqa: F401 - they register ops
from mlsd.coreml.ops_base import OPS, OpImpl, register, torch_dtype

__all__ = ["OPS", "OpImpl", "register", "supported_op_types", "torch_dtype"]


def supported_op_types() -> frozenset[str]:
    """Every op type the executor can run, plus `const`, which it folds at load."""
    return frozenset(OPS) | {"const"}
