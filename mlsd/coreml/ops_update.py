"""Ops that write into a copy of a tensor: slice_update, scatter_along_axis; plus crop."""

from __future__ import annotations

import torch

from mlsd.coreml.ops_base import ints, norm_axis, register, tensor
from mlsd.coreml.ops_tensor import slice_by_index


@register("slice_update")
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    # Slicing a tensor of flat positions with the very same rules finds the elements to overwrite.
    positions = torch.arange(x.numel()).reshape(x.shape)
    chosen = slice_by_index(positions, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x.clone().reshape(-1)
    out[chosen.reshape(-1)] = tensor(update, x).reshape(-1)
    return out.reshape(x.shape)


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@register("scatter_along_axis")
def scatter_along_axis(data, indices, updates, axis=0, mode="add", validate_indices=False):
    a = norm_axis(int(axis), data.dim())
    idx = tensor(indices).long()
    idx = torch.where(idx < 0, idx + data.shape[a], idx)
    if mode == "update":
        return data.scatter(a, idx, updates)
    if mode == "add":
        return data.scatter_add(a, idx, updates)
    if mode == "sub":
        return data.scatter_add(a, idx, -updates)
    if mode == "div":
        return data.scatter_reduce(a, idx, 1.0 / updates, "prod")
    return data.scatter_reduce(a, idx, updates, _SCATTER_REDUCE[mode])


@register("crop")
def crop(x, crop_height, crop_width):
    (top, bottom), (left, right) = ints(crop_height), ints(crop_width)
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]
