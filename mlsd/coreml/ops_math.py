"""Elementwise, activation, reduction and softmax ops (MIL iOS15-iOS18 semantics)."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from mlsd.coreml.ops_base import ints, norm_axes, register, scalar, tensor

# --- elementwise binary: Python operators follow NumPy broadcasting and also accept a scalar const
# on either side, which torch.add/torch.sub do not.
_BINARY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "real_div": operator.truediv,
    "floor_div": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "equal": operator.eq,
    "not_equal": operator.ne,
    "greater": operator.gt,
    "greater_equal": operator.ge,
    "less": operator.lt,
    "less_equal": operator.le,
}


def _binary(fn):
    def impl(x, y):
        if not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor):
            x = torch.as_tensor(x)
        return fn(x, y)

    return impl


for _name, _fn in _BINARY.items():
    register(_name)(_binary(_fn))


def _pair(x, y):
    if isinstance(x, torch.Tensor):
        return x, tensor(y, x)
    y = tensor(y)
    return tensor(x, y), y


@register("maximum")
def maximum(x, y):
    return torch.maximum(*_pair(x, y))


@register("minimum")
def minimum(x, y):
    return torch.minimum(*_pair(x, y))


@register("logical_and")
def logical_and(x, y):
    return torch.logical_and(*_pair(x, y))


@register("logical_or")
def logical_or(x, y):
    return torch.logical_or(*_pair(x, y))


@register("logical_xor")
def logical_xor(x, y):
    return torch.logical_xor(*_pair(x, y))


# --- elementwise unary
_UNARY = {
    "abs": torch.abs,
    "acos": torch.acos,
    "asin": torch.asin,
    "atan": torch.atan,
    "atanh": torch.atanh,
    "ceil": torch.ceil,
    "cos": torch.cos,
    "cosh": torch.cosh,
    "erf": torch.erf,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "floor": torch.floor,
    "round": torch.round,
    "sign": torch.sign,
    "sin": torch.sin,
    "sinh": torch.sinh,
    "sqrt": torch.sqrt,
    "tan": torch.tan,
    "tanh": torch.tanh,
    "logical_not": torch.logical_not,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": F.softplus,
    "softsign": F.softsign,
}


def _unary(fn):
    def impl(x):
        return fn(tensor(x))

    return impl


for _name, _fn in _UNARY.items():
    register(_name)(_unary(_fn))


@register("square")
def square(x):
    return x * x


@register("relu6")
def relu6(x):
    return torch.clamp(x, 0.0, 6.0)


@register("inverse")
def inverse(x, epsilon=1e-4):
    return 1.0 / (x + epsilon)


@register("log")
def log(x, epsilon=1e-45):
    return torch.log(x + epsilon)


@register("rsqrt")
def rsqrt(x, epsilon=1e-12):
    return torch.rsqrt(x + epsilon)


@register("clip")
def clip(x, alpha, beta):
    return torch.minimum(torch.maximum(x, tensor(alpha, x)), tensor(beta, x))


@register("threshold")
def threshold(x, alpha):
    return torch.maximum(x, tensor(alpha, x))


@register("gelu")
def gelu(x, mode="EXACT"):
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"gelu: unknown mode {mode!r}")


@register("leaky_relu")
def leaky_relu(x, alpha=0.01):
    return torch.where(x >= 0, x, x * alpha)


@register("elu")
def elu(x, alpha=1.0):
    return torch.where(x > 0, x, alpha * torch.expm1(x))


@register("clamped_relu")
def clamped_relu(x, alpha, beta):
    return torch.clamp(torch.where(x >= 0, x, x * alpha), max=beta)


@register("thresholded_relu")
def thresholded_relu(x, alpha=1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


@register("linear_activation")
def linear_activation(x, alpha, beta=0.0):
    return x * alpha + beta


@register("scaled_tanh")
def scaled_tanh(x, alpha=1.0, beta=1.0):
    return alpha * torch.tanh(x * beta)


@register("sigmoid_hard")
def sigmoid_hard(x, alpha=0.2, beta=0.5):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def _per_channel(param, x):
    # alpha/beta vectors of prelu and softplus_parametric run along axis 1 (channels).
    p = tensor(param, x)
    return p.reshape([1, -1] + [1] * (x.dim() - 2)) if p.dim() == 1 else p


@register("prelu")
def prelu(x, alpha):
    return torch.where(x >= 0, x, x * _per_channel(alpha, x))


@register("softplus_parametric")
def softplus_parametric(x, alpha, beta):
    return _per_channel(alpha, x) * torch.log1p(torch.exp(x * _per_channel(beta, x)))


@register("softmax")
def softmax(x, axis=-1):
    return torch.softmax(x, dim=int(axis))


# --- reductions: axes=None reduces over every dimension.
def _axes(x, axes):
    return list(range(x.dim())) if axes is None else norm_axes(ints(axes), x.dim())


def _reduction(fn):
    def impl(x, axes=None, keep_dims=False):
        dims = _axes(x, axes)
        return fn(x, dims, bool(keep_dims)) if dims else x

    return impl


_REDUCTIONS = {
    "reduce_sum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "reduce_mean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "reduce_max": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "reduce_min": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "reduce_prod": lambda x, d, k: _prod(x, d, k),
    "reduce_l1_norm": lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k),
    "reduce_l2_norm": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "reduce_sum_square": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "reduce_log_sum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


for _name, _fn in _REDUCTIONS.items():
    register(_name)(_reduction(_fn))


@register("reduce_argmax")
def reduce_argmax(x, axis=-1, keep_dims=False, output_dtype="int32"):
    return torch.argmax(x, dim=int(scalar(axis)), keepdim=bool(keep_dims))


@register("reduce_argmin")
def reduce_argmin(x, axis=-1, keep_dims=False, output_dtype="int32"):
    return torch.argmin(x, dim=int(scalar(axis)), keepdim=bool(keep_dims))
