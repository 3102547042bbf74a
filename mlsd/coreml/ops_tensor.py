"""Shape, indexing, creation and selection ops (MIL iOS15-iOS18 semantics)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlsd.coreml.ops_base import bools, ints, norm_axes, norm_axis, register, scalar, tensor, torch_dtype


@register("identity")
def identity(x):
    return tensor(x)


@register("reshape")
def reshape(x, shape):
    shape = ints(shape)
    if len(shape) == x.dim():
        # 0 inherits the input's size in that position (only when the ranks match).
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@register("transpose")
def transpose(x, perm):
    return x.permute(ints(perm))


@register("expand_dims")
def expand_dims(x, axes):
    x = tensor(x)
    out_rank = x.dim() + len(ints(axes))
    for a in sorted(norm_axes(ints(axes), out_rank)):
        x = x.unsqueeze(a)
    return x


@register("squeeze")
def squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    # PyTorch semantics by the op docs: axes whose size is not 1 are left alone.
    return x.squeeze(tuple(norm_axes(ints(axes), x.dim())))


@register("flatten2d")
def flatten2d(x, axis=1):
    a = norm_axis(int(axis), x.dim())
    return x.reshape(math.prod(x.shape[:a]), -1)


@register("concat")
def concat(values, axis, interleave=False):
    values = [tensor(v) for v in values]
    if not interleave:
        return torch.cat(values, dim=int(axis))
    a = norm_axis(int(axis), values[0].dim())
    stacked = torch.stack(values, dim=a + 1)
    shape = list(values[0].shape)
    shape[a] *= len(values)
    return stacked.reshape(shape)


@register("stack")
def stack(values, axis):
    return torch.stack([tensor(v) for v in values], dim=int(axis))


@register("split")
def split(x, axis, num_splits=None, split_sizes=None):
    if split_sizes is not None:
        return torch.split(x, ints(split_sizes), dim=int(axis))
    return torch.chunk(x, int(num_splits), dim=int(axis))


def _index(x, dim, start, stop, step):
    if step > 0:
        index = [slice(None)] * x.dim()
        index[dim] = slice(start, stop, step)
        return x[tuple(index)]
    # torch slicing has no negative steps; gather the indices explicitly.
    return x.index_select(dim, torch.arange(start, stop, step, device=x.device))


@register("slice_by_index")
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = x.dim()
    begin, end = ints(begin), ints(end)
    stride = ints(stride) if stride is not None else [1] * rank
    bmask, emask, smask = bools(begin_mask, rank), bools(end_mask, rank), bools(squeeze_mask, rank)
    squeezed = []
    for d in range(rank):
        if smask[d]:
            # Pure indexing at begin[d]; the dimension is dropped afterwards.
            start = begin[d] + x.shape[d] if begin[d] < 0 else begin[d]
            x = x.narrow(d, start, 1)
            squeezed.append(d)
            continue
        sl = slice(None if bmask[d] else begin[d], None if emask[d] else end[d], stride[d])
        x = _index(x, d, *sl.indices(x.shape[d]))
    return x.squeeze(tuple(squeezed)) if squeezed else x


@register("slice_by_size")
def slice_by_size(x, begin, size):
    for d, (b, s) in enumerate(zip(ints(begin), ints(size))):
        b = b + x.shape[d] if b < 0 else b
        x = x.narrow(d, b, x.shape[d] - b if s == -1 else s)
    return x


def _long(indices, size):
    idx = tensor(indices).long()
    return torch.where(idx < 0, idx + size, idx)


@register("gather")
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x = tensor(x)
    a, b = norm_axis(int(axis), x.dim()), int(batch_dims)
    idx = _long(indices, x.shape[a])
    if b == 0:
        out = x.index_select(a, idx.reshape(-1))
        return out.reshape(list(x.shape[:a]) + list(idx.shape) + list(x.shape[a + 1 :]))
    # Batched (tf.gather batch_dims): flatten the batch, gather per batch row, then put the
    # dims between the batch and `axis` back in front of the index dims.
    batch, rest = list(x.shape[:b]), list(x.shape[b:a]) + list(x.shape[a + 1 :])
    rows = math.prod(batch)
    xt = x.movedim(a, b).reshape(rows, x.shape[a], *rest)
    g = xt[torch.arange(rows).unsqueeze(1), idx.reshape(rows, -1)]
    g = g.reshape(*batch, *idx.shape[b:], *rest)
    n_idx, n_mid = idx.dim() - b, a - b
    perm = list(range(b)) + [b + n_idx + j for j in range(n_mid)] + [b + j for j in range(n_idx)]
    return g.permute(perm + list(range(b + n_idx + n_mid, g.dim())))


@register("gather_along_axis")
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    a = norm_axis(int(axis), x.dim())
    return torch.gather(x, a, _long(indices, x.shape[a]))


@register("gather_nd")
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    idx = tensor(indices).long()
    b = int(batch_dims)
    k = idx.shape[-1]
    flat_idx = idx.reshape(-1, *idx.shape[b:]) if b else idx.unsqueeze(0)
    flat_x = x.reshape(-1, *x.shape[b:]) if b else x.unsqueeze(0)
    rows = []
    for xi, ii in zip(flat_x, flat_idx):
        sizes = torch.tensor(xi.shape[:k])
        ii = torch.where(ii < 0, ii + sizes, ii)
        rows.append(xi[tuple(ii[..., j] for j in range(k))])
    out = torch.stack(rows)
    return out.reshape(list(idx.shape[:-1]) + list(x.shape[b + k :]))


@register("tile")
def tile(x, reps):
    return x.repeat(ints(reps))


@register("reverse")
def reverse(x, axes=None):
    dims = list(range(x.dim())) if axes is None else norm_axes(ints(axes), x.dim())
    return torch.flip(x, dims)


@register("pad")
def pad(x, pad, mode="constant", constant_val=0.0):
    p = ints(pad)
    # MIL lists (before, after) from the first padded dim on; F.pad wants the last dim first.
    flat = [v for i in range(len(p) // 2 - 1, -1, -1) for v in (p[2 * i], p[2 * i + 1])]
    if mode == "constant":
        return F.pad(x, flat, value=float(scalar(constant_val)))
    n = len(p) // 2
    # F.pad's reflect/replicate want a batch and channel dim in front of the padded dims.
    lead = x.shape[: x.dim() - n]
    y = F.pad(
        x.reshape(1, -1, *x.shape[x.dim() - n :]),
        flat,
        mode={"reflect": "reflect", "replicate": "replicate"}[mode],
    )
    return y.reshape(*lead, *y.shape[2:])


@register("cast")
def cast(x, dtype):
    return tensor(x).to(torch_dtype(dtype))


@register("fill")
def fill(shape, value=0.0):
    return torch.full(ints(shape), scalar(value))


@register("fill_like")
def fill_like(ref_tensor, value=0.0):
    return torch.full(ref_tensor.shape, scalar(value))


@register("range_1d")
def range_1d(end, start, step):
    return torch.arange(scalar(start), scalar(end), scalar(step))


@register("shape")
def shape(x):
    return torch.tensor(list(tensor(x).shape), dtype=torch.int32)


@register("select")
def select(cond, a, b):
    cond = tensor(cond).bool()
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        a = torch.as_tensor(a)
    return torch.where(cond, a, b)


@register("band_part")
def band_part(x, lower=-1, upper=-1):
    m, n = x.shape[-2], x.shape[-1]
    diff = torch.arange(m).unsqueeze(1) - torch.arange(n).unsqueeze(0)  # row - col
    keep = torch.ones(m, n, dtype=torch.bool)
    if int(lower) >= 0:
        keep &= diff <= int(lower)
    if int(upper) >= 0:
        keep &= -diff <= int(upper)
    return torch.where(keep, x, torch.zeros_like(x))


@register("cumsum")
def cumsum(x, axis=0, exclusive=False, reverse=False):
    a = norm_axis(int(axis), x.dim())
    y = torch.flip(x, [a]) if reverse else x
    out = torch.cumsum(y, a)
    if exclusive:
        out = out - y
    return torch.flip(out, [a]) if reverse else out


@register("one_hot")
def one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    idx = tensor(indices).long()
    size = int(scalar(one_hot_vector_size))
    hot = F.one_hot(idx.clamp(0, size - 1), size).bool() & ((idx >= 0) & (idx < size)).unsqueeze(-1)
    on, off = torch.as_tensor(scalar(on_value)), torch.as_tensor(scalar(off_value))
    out = torch.where(hot, on, off)
    return out.movedim(-1, norm_axis(int(axis), idx.dim() + 1))


@register("argsort")
def argsort(x, axis=-1, ascending=False):
    return torch.argsort(x, dim=int(axis), descending=not ascending, stable=True)


@register("topk")
def topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True):
    values, indices = torch.topk(x, int(k), dim=int(axis), largest=not ascending, sorted=True)
    return (values, indices) if return_indices else values


@register("non_zero")
def non_zero(x):
    return torch.nonzero(x)


@register("depth_to_space")
def depth_to_space(x, block_size):
    b = int(block_size)
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("space_to_depth")
def space_to_depth(x, block_size):
    b = int(block_size)
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@register("pixel_shuffle")
def pixel_shuffle(x, upscale_factor):
    return F.pixel_shuffle(x, int(upscale_factor))


@register("pixel_unshuffle")
def pixel_unshuffle(x, downscale_factor):
    return F.pixel_unshuffle(x, int(downscale_factor))
