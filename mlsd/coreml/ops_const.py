"""Compressed-weight ops (constexpr_*, evaluated once at load) and iOS17 (de)quantization."""

from __future__ import annotations

import torch

from mlsd.coreml.ops_base import ints, norm_axis, register, tensor, torch_dtype


def _unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """Indices packed LSB-first, one byte after another (constexpr_lut_to_dense iOS16 docs)."""
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1
    bits = bits.reshape(-1)[: count * nbits].reshape(count, nbits)
    return (bits << torch.arange(nbits)).sum(-1)


def _along_axis(param, data: torch.Tensor, axis) -> torch.Tensor:
    """Scale/zero-point vectors run along `axis`; scalars broadcast everywhere."""
    p = tensor(param).to(torch.float32)
    if p.dim() == 0 or p.dim() == data.dim():
        return p
    shape = [1] * data.dim()
    shape[norm_axis(int(axis), data.dim())] = -1
    return p.reshape(shape)


def _lut_dense_ios18(indices: torch.Tensor, lut: torch.Tensor, vector_axis) -> torch.Tensor:
    idx = indices.long()
    k = idx.dim()
    # LUT dims [:k] split the (indices-shaped) tensor into equal blocks, one palette per block.
    grids = []
    for d in range(k):
        block = idx.shape[d] // lut.shape[d]
        shape = [1] * k
        shape[d] = -1
        grids.append((torch.arange(idx.shape[d]) // block).reshape(shape))
    vals = lut[tuple(grids) + (idx,)]  # indices.shape + [vector_size]
    if lut.shape[-1] == 1:
        return vals[..., 0]
    axis = norm_axis(int(vector_axis), k)
    out_shape = list(idx.shape)
    out_shape[axis] *= lut.shape[-1]
    return vals.movedim(-1, axis + 1).reshape(out_shape)


@register("constexpr_lut_to_dense")
def constexpr_lut_to_dense(indices, lut, shape=None, vector_axis=None):
    lut = tensor(lut)
    if shape is not None:  # iOS16 form: bit-packed uint8 indices, 1-D LUT, explicit shape
        out_shape = ints(shape)
        count = 1
        for s in out_shape:
            count *= s
        nbits = int(lut.shape[0]).bit_length() - 1
        return lut[_unpack_bits(tensor(indices), nbits, count)].reshape(out_shape)
    return _lut_dense_ios18(tensor(indices), lut, vector_axis)


@register("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    q = tensor(quantized_data).to(torch.float32)
    return (q - _along_axis(zero_point, q, axis)) * _along_axis(scale, q, axis)


def _blocks(param, data: torch.Tensor) -> torch.Tensor:
    p = tensor(param).to(torch.float32)
    for d in range(data.dim()):
        reps = data.shape[d] // p.shape[d]
        if reps > 1:
            p = p.repeat_interleave(reps, dim=d)
    return p


@register("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    x = tensor(data).to(torch.float32)
    if offset is not None:
        x = x - _blocks(offset, x)
    return x * _blocks(scale, x)


@register("constexpr_cast")
def constexpr_cast(source_val, output_dtype):
    return tensor(source_val).to(torch_dtype(output_dtype))


@register("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(nonzero_data, mask, shape=None):
    data = tensor(nonzero_data)
    if shape is not None:  # iOS16 form: mask bits packed LSB-first into uint8
        out_shape = ints(shape)
        count = 1
        for s in out_shape:
            count *= s
        keep = _unpack_bits(tensor(mask), 1, count).bool()
    else:
        out_shape = list(mask.shape)
        keep = tensor(mask).reshape(-1).bool()
    out = torch.zeros(keep.numel(), dtype=data.dtype)
    out[keep] = data.reshape(-1)
    return out.reshape(out_shape)


_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535)}


@register("quantize")
def quantize(input, scale, output_dtype, zero_point=None, axis=None):
    lo, hi = _INT_RANGES[str(output_dtype)]
    q = torch.round(input / _along_axis(scale, input, axis))
    if zero_point is not None:
        q = q + _along_axis(zero_point, input, axis)
    return q.clamp(lo, hi).to(torch_dtype(str(output_dtype)))


@register("dequantize")
def dequantize(input, scale, zero_point=None, axis=None):
    x = input.to(torch.float32)
    if zero_point is not None:
        x = x - _along_axis(zero_point, x, axis)
    return x * _along_axis(scale, x, axis)
