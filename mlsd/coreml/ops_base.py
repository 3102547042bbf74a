"""Registry and small helpers shared by the MIL op implementations.

An implementation receives the op's inputs as keyword arguments named as in the MIL op
definition. Tensor-typed inputs arrive as torch tensors, scalar consts as Python scalars
(or strings), and optional inputs that the program omits are simply absent, so every
implementation spells out the documented default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

OpImpl = Callable[..., Any]

OPS: dict[str, OpImpl] = {}

# MIL dtype name -> torch dtype the executor stores values in. Every float type is computed in
# float32; fp16 values are rounded at op boundaries by the executor instead.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float32,
    "fp32": torch.float32,
    "fp64": torch.float32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.int32,
    "int32": torch.int32,
    "uint32": torch.int64,
    "int64": torch.int64,
    "bool": torch.bool,
}


def register(*names: str) -> Callable[[OpImpl], OpImpl]:
    def deco(fn: OpImpl) -> OpImpl:
        for name in names:
            OPS[name] = fn
        return fn

    return deco


def ints(value: Any) -> list[int]:
    """Integer list from a const (Python/NumPy) or a runtime tensor; scalars become one-item lists."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [int(v) for v in value]
    return [int(value)]


def scalar(value: Any) -> Any:
    """Python scalar from a const or a one-element tensor."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.item()
    return value


def bools(value: Any, n: int) -> list[bool]:
    if value is None:
        return [False] * n
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    if isinstance(value, bool):
        return [value] * n
    return [bool(v) for v in value]


def tensor(value: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if like is not None:
        return torch.as_tensor(value, dtype=like.dtype)
    return torch.as_tensor(value)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def norm_axes(axes: Sequence[int], rank: int) -> list[int]:
    return [norm_axis(int(a), rank) for a in axes]


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise NotImplementedError(f"MIL dtype {name!r} has no torch equivalent in the executor") from None
