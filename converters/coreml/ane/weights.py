"""diffusers UNet2DConditionModel state dict -> AneUNet state dict.

All renames and reshapes live in `map_diffusers_key`, a pure function, so the whole mapping can be
checked key by key without building either model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Module paths whose structure differs between diffusers and AneUNet (diffusers wraps these linears in
# ModuleLists with dropout; here each is a single 1x1 conv).
_RENAMES = (
    (re.compile(r"\.to_out\.0\.(weight|bias)$"), r".to_out.\1"),
    (re.compile(r"\.ff\.net\.0\.proj\.(weight|bias)$"), r".ff.geglu.\1"),
    (re.compile(r"\.ff\.net\.2\.(weight|bias)$"), r".ff.out.\1"),
)
_TOP_LEVEL = (
    "conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks.", "conv_norm_out.", "conv_out.",
)


def map_diffusers_key(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one diffusers parameter to the AneUNet parameter(s) it becomes.

    Every 2D weight in an SD UNet belongs to an nn.Linear (time embedding, time_emb_proj, q/k/v/out,
    GEGLU, SD2's linear proj_in/proj_out); here each is a 1x1 conv, hence (out, in) -> (out, in, 1, 1).
    A list is returned so a future mapping may split or drop a tensor; for SD1/SD2 it is always one.
    """
    if not key.startswith(_TOP_LEVEL):
        raise KeyError(f"diffusers UNet parameter {key!r} has no AneUNet counterpart")
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    if tensor.ndim == 2:
        tensor = tensor.reshape(*tensor.shape, 1, 1)
    return [(key, tensor)]


def convert_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for new_key, new_tensor in map_diffusers_key(key, tensor):
            if new_key in out:
                raise ValueError(f"two diffusers parameters map to {new_key!r}")
            out[new_key] = new_tensor
    return out
