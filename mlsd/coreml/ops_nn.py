"""Convolution, matmul, normalization, pooling, attention and resampling ops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlsd.coreml.ops_base import ints, norm_axes, register, scalar, tensor


def _same_pads(in_sizes, kernel, strides, dilations, lower):
    """Per-dim (before, after) padding of pad_type same/same_lower, as MIL's aggregated_pad computes it."""
    pads = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        eff = (k - 1) * d + 1
        total = max(0, s * math.ceil(size / s) - size + eff - s)
        small, big = total // 2, total - total // 2
        pads.append((big, small) if lower else (small, big))
    return pads


def _pads(x, kernel, strides, dilations, pad_type, pad):
    n = len(kernel)
    if pad_type in ("same", "same_lower"):
        return _same_pads(x.shape[2:], kernel, strides, dilations, pad_type == "same_lower")
    if pad_type == "custom" and pad is not None:
        p = ints(pad)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("valid", "custom"):
        return [(0, 0)] * n
    raise ValueError(f"unknown pad_type {pad_type!r}")


def _pad_spatial(x, pads, value=0.0):
    # F.pad lists the last dimension first.
    flat = [v for before_after in reversed(pads) for v in before_after]
    return F.pad(x, flat, value=value) if any(flat) else x


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register("conv")
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    n = weight.dim() - 2
    strides = ints(strides) if strides is not None else [1] * n
    dilations = ints(dilations) if dilations is not None else [1] * n
    pads = _pads(x, list(weight.shape[2:]), strides, dilations, pad_type, pad)
    # Symmetric padding goes to the conv kernel itself, avoiding a padded copy of the activation.
    if all(b == a for b, a in pads):
        return _CONV[n](x, weight, bias, strides, [b for b, _ in pads], dilations, int(groups))
    return _CONV[n](_pad_spatial(x, pads), weight, bias, strides, 0, dilations, int(groups))


@register("conv_transpose")
def conv_transpose(
    x,
    weight,
    bias=None,
    pad=None,
    output_shape=None,
    pad_type="valid",
    strides=None,
    dilations=None,
    groups=1,
):
    n = weight.dim() - 2
    strides = ints(strides) if strides is not None else [1] * n
    dilations = ints(dilations) if dilations is not None else [1] * n
    kernel = list(weight.shape[2:])
    full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(n)]
    if pad_type == "custom" and pad is not None:
        p = ints(pad)
        crops = [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    elif pad_type == "same":
        crops = []
        for i in range(n):
            total = max(0, full[i] - x.shape[2 + i] * strides[i])
            crops.append((total // 2, total - total // 2))
    else:
        crops = [(0, 0)] * n
    y = _CONV_T[n](x, weight, None, strides, 0, 0, int(groups), dilations)
    target = ints(output_shape)[2:] if output_shape is not None else None
    index = [slice(None), slice(None)]
    for i, (before, after) in enumerate(crops):
        stop = before + target[i] if target else y.shape[2 + i] - after
        if stop > y.shape[2 + i]:
            y = F.pad(y, [0, 0] * (n - 1 - i) + [0, stop - y.shape[2 + i]])
        index.append(slice(before, stop))
    y = y[tuple(index)]
    if bias is not None:
        y = y + bias.reshape([1, -1] + [1] * n)
    return y


@register("linear")
def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


@register("matmul")
def matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = tensor(x), tensor(y)
    if transpose_x and x.dim() > 1:
        x = x.transpose(-1, -2)
    if transpose_y and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@register("einsum")
def einsum(values, equation):
    return torch.einsum(equation, *values)


def _channel(param, x):
    return None if param is None else param.reshape([1, -1] + [1] * (x.dim() - 2))


@register("layer_norm")
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    dims = sorted(norm_axes(ints(axes), x.dim())) if axes is not None else list(range(x.dim()))
    if dims == list(range(x.dim() - len(dims), x.dim())):
        # Trailing axes: the fused kernel matches the documented formula and is much faster.
        shape = x.shape[x.dim() - len(dims) :]
        return F.layer_norm(x, shape, gamma, beta, float(epsilon))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + epsilon)
    # gamma/beta have shape x.shape[axes]; place them on those axes to broadcast.
    bshape = [x.shape[i] if i in dims else 1 for i in range(x.dim())]
    if gamma is not None:
        y = y * gamma.reshape(bshape)
    if beta is not None:
        y = y + beta.reshape(bshape)
    return y


@register("instance_norm")
def instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    return F.instance_norm(x, weight=gamma, bias=beta, eps=float(epsilon))


@register("batch_norm")
def batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    y = (x - _channel(mean, x)) / torch.sqrt(_channel(variance, x) + epsilon)
    if gamma is not None:
        y = y * _channel(gamma, x)
    if beta is not None:
        y = y + _channel(beta, x)
    return y


@register("l2_norm")
def l2_norm(x, epsilon=1e-6):
    dims = [-3, -2, -1] if x.dim() >= 3 else list(range(x.dim()))
    return x / torch.sqrt(torch.sum(x * x, dims, keepdim=True) + epsilon)


def _pool_args(x, kernel_sizes, strides, pad_type, pad):
    kernel = ints(kernel_sizes)
    strides = ints(strides) if strides is not None else [1] * len(kernel)
    return kernel, strides, _pads(x, kernel, strides, [1] * len(kernel), pad_type, pad)


@register("max_pool")
def max_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    kernel, strides, pads = _pool_args(x, kernel_sizes, strides, pad_type, pad)
    x = _pad_spatial(x, pads, value=-math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    return fn(x, kernel, strides, 0, ceil_mode=bool(ceil_mode))


@register("avg_pool")
def avg_pool(
    x,
    kernel_sizes,
    strides=None,
    pad_type="valid",
    pad=None,
    exclude_padding_from_average=False,
    ceil_mode=False,
):
    kernel, strides, pads = _pool_args(x, kernel_sizes, strides, pad_type, pad)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    mean = fn(_pad_spatial(x, pads), kernel, strides, 0, ceil_mode=bool(ceil_mode))
    if not exclude_padding_from_average or not any(v for p in pads for v in p):
        return mean
    # Fraction of each window that is real input; dividing by it drops the padded zeros from the mean.
    real = fn(_pad_spatial(torch.ones_like(x[:1, :1]), pads), kernel, strides, 0, ceil_mode=bool(ceil_mode))
    return mean / real


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)


# --- resampling over the last two dimensions.
def _grid(n_in, n_out, mode):
    """Source coordinates per output index for MIL's sampling modes (resize_bilinear docs)."""
    i = torch.arange(n_out, dtype=torch.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            pos = torch.full_like(i, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            pos = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        pos = i * ((n_in - n_in / n_out) / (n_out - 1)) if n_out > 1 else torch.zeros_like(i)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        pos = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        pos = (i + 0.5) * (n_in / n_out) - 0.5
    else:
        raise ValueError(f"unknown sampling_mode {mode!r}")
    return pos.clamp(0, n_in - 1)


def _lerp(x, pos, dim):
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=x.shape[dim] - 1)
    w = (pos - lo).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    a, b = x.index_select(dim, lo), x.index_select(dim, hi)
    return a + (b - a) * w.reshape(shape)


def _bilinear(x, h, w, mode):
    y = _lerp(x, _grid(x.shape[-2], h, mode), x.dim() - 2)
    return _lerp(y, _grid(x.shape[-1], w, mode), x.dim() - 1)


def _nearest(x, h, w, scale_h=None, scale_w=None):
    hi = torch.floor(
        torch.arange(h, dtype=torch.float64) * (x.shape[-2] / h if scale_h is None else 1 / scale_h)
    )
    wi = torch.floor(
        torch.arange(w, dtype=torch.float64) * (x.shape[-1] / w if scale_w is None else 1 / scale_w)
    )
    y = x.index_select(x.dim() - 2, hi.long().clamp(max=x.shape[-2] - 1))
    return y.index_select(x.dim() - 1, wi.long().clamp(max=x.shape[-1] - 1))


@register("upsample_nearest_neighbor")
def upsample_nearest_neighbor(x, scale_factor_height=1, scale_factor_width=1):
    sh, sw = float(scalar(scale_factor_height)), float(scalar(scale_factor_width))
    h, w = math.floor(x.shape[-2] * sh), math.floor(x.shape[-1] * sw)
    if sh.is_integer() and sw.is_integer():
        return x.repeat_interleave(int(sh), dim=-2).repeat_interleave(int(sw), dim=-1)
    return _nearest(x, h, w, sh, sw)


@register("resize_nearest_neighbor")
def resize_nearest_neighbor(x, target_size_height, target_size_width):
    return _nearest(x, int(target_size_height), int(target_size_width))


@register("upsample_bilinear")
def upsample_bilinear(
    x, scale_factor_height=1, scale_factor_width=1, align_corners=True, half_pixel_centers=None
):
    h = math.floor(x.shape[-2] * float(scalar(scale_factor_height)))
    w = math.floor(x.shape[-1] * float(scalar(scale_factor_width)))
    if half_pixel_centers is None:
        half_pixel_centers = not align_corners
    if align_corners:
        mode = "STRICT_ALIGN_CORNERS"
    else:
        mode = "UNALIGN_CORNERS" if half_pixel_centers else "DEFAULT"
    return _bilinear(x, h, w, mode)


@register("resize_bilinear")
def resize_bilinear(x, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):
    return _bilinear(x, int(target_size_height), int(target_size_width), sampling_mode)


@register("resize")
def resize(x, shape, resized_dims, interpolation_mode="LINEAR", sampling_mode="DEFAULT"):
    target, k = ints(shape), int(resized_dims)
    out = list(x.shape)
    for j in range(1, k + 1):
        out[-j] = target[-j] or x.shape[-j]
    if k != 2 and out[:-2] != list(x.shape[:-2]):
        raise NotImplementedError("resize: only the last two dimensions can be resized")
    if interpolation_mode == "NEAREST_NEIGHBOR":
        return _nearest(x, out[-2], out[-1])
    return _bilinear(x, out[-2], out[-1], sampling_mode)
