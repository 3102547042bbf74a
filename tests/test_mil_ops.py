"""Per-op checks of the MIL reference executor against an independent reference.

Each case builds the op twice with coremltools' MIL builder: once over placeholders, run by the
executor, and once over consts, where coremltools' own `value_inference` (NumPy, in coremltools)
gives the expected value. Ops without a value inference are checked against NumPy written from
the MIL op documentation instead.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from mlsd.coreml.testing import run_op, value_inference  # noqa: E402

iOS16, iOS17, iOS18 = ct.target.iOS16, ct.target.iOS17, ct.target.iOS18
RNG = np.random.default_rng(7)


def f32(*shape, lo=None, hi=None):
    if lo is not None:
        return RNG.uniform(lo, hi, shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def i32(*shape, lo=0, hi=5):
    return RNG.integers(lo, hi, shape).astype(np.int32)


def execute(build, data, opset=iOS17, **kw):
    return run_op(build, data, opset, **kw)


def check(build, data, opset=iOS17, ref=None, rtol=1e-5, atol=1e-5):
    """Executor over placeholders vs `ref`, or vs coremltools' value inference over consts."""
    got = execute(build, data, opset)
    want = value_inference(build, data, opset) if ref is None else (ref if isinstance(ref, list) else [ref])
    assert all(w is not None for w in want), "op defines no value inference; give a NumPy reference"
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        w = np.asarray(w)
        assert g.shape == w.shape, (g.shape, w.shape)
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- value-inference references
def _op(name, data, opset=iOS17, **attrs):
    """Case for op `name`: `data` entries (keyed by MIL input name) become placeholders, `attrs` consts."""
    return pytest.param(lambda **d: getattr(mb, name)(**d, **attrs), data, opset, id=name)


def _x(name, x, opset=iOS17, **attrs):
    return _op(name, {"x": x}, opset, **attrs)


def _xy(name, x, y):
    return _op(name, {"x": x, "y": y})


_X, _Y, _M = f32(2, 1, 3), f32(4, 3), f32(3, 4)
_POS = f32(2, 3, lo=0.2, hi=3.0)
_B1, _B2 = RNG.random((2, 3)) > 0.5, RNG.random((1, 3)) > 0.5
_F = np.float32
VI_CASES = [
    *[_xy(n, _X, _Y) for n in ["add", "sub", "mul", "maximum", "minimum", "equal", "not_equal", "greater"]],
    *[_xy(n, _X, _Y) for n in ["greater_equal", "less", "less_equal", "floor_div", "mod"]],
    _xy("real_div", _X, f32(4, 3, lo=0.5, hi=2.0)),
    _xy("pow", _POS, f32(1, 3)),
    *[_xy(n, i32(3, 4, lo=-9, hi=9), i32(1, 4, lo=1, hi=4)) for n in ["add", "mul", "floor_div", "mod"]],
    *[_xy(n, _B1, _B2) for n in ["logical_and", "logical_or", "logical_xor"]],
    _x("mul", _X, y=_F(2.5)),
    _op("sub", {"y": _X}, x=_F(1.0)),
    *[_x(n, _M) for n in ["abs", "atan", "ceil", "cos", "cosh", "erf", "exp", "floor", "round", "sign", "sin"]],
    *[_x(n, _M) for n in ["sinh", "square", "tanh", "sigmoid", "relu", "softsign", "softplus", "exp2", "relu6"]],
    *[_x(n, f32(3, 4, lo=-0.9, hi=0.9)) for n in ["acos", "asin", "atanh", "tan"]],
    *[_x(n, _POS) for n in ["sqrt", "rsqrt", "log", "inverse"]],
    *[_x(n, _POS, epsilon=_F(0.5)) for n in ["rsqrt", "log", "inverse"]],
    _x("logical_not", _B1),
    _x("clip", _M, alpha=_F(-0.5), beta=_F(0.7)),
    _x("threshold", _M, alpha=_F(0.1)),
    *[_x("gelu", _M, mode=m) for m in ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"]],
    _x("leaky_relu", _M, alpha=_F(0.2)),
    _x("elu", _M, alpha=_F(0.7)),
    _x("clamped_relu", _M, alpha=_F(0.3), beta=_F(0.5)),
    _x("thresholded_relu", _M, alpha=_F(0.2)),
    _x("linear_activation", _M, alpha=_F(2.0), beta=_F(-1.0)),
    _x("scaled_tanh", _M, alpha=_F(2.0), beta=_F(0.5)),
    _x("sigmoid_hard", _M, alpha=_F(0.3), beta=_F(0.4)),
    _x("prelu", f32(1, 3, 2, 2), alpha=_F([0.1, 0.2, 0.3])),
    _x("softplus_parametric", f32(1, 3, 2, 2), alpha=f32(3, lo=0.5, hi=1), beta=f32(3, lo=0.5, hi=1)),
    _x("softmax", f32(2, 3, 4), axis=1),
    *[_x(n, f32(2, 3, 4), axes=[1, -1], keep_dims=k) for n in ["reduce_sum", "reduce_mean"] for k in (False, True)],
    *[_x(n, f32(2, 3, 4), axes=[0, 2]) for n in ["reduce_max", "reduce_min", "reduce_prod", "reduce_l1_norm"]],
    *[_x(n, f32(2, 3, 4), axes=[1]) for n in ["reduce_l2_norm", "reduce_sum_square", "reduce_log_sum_exp"]],
    _x("reduce_log_sum", f32(2, 3, 4, lo=0.1, hi=2), axes=[2]),
    _x("reduce_sum", f32(2, 3, 4)),
    *[_x(n, f32(2, 3, 4), axis=1, keep_dims=k) for n in ["reduce_argmax", "reduce_argmin"] for k in (False, True)],
    # layer_norm over trailing axes and over the channel axis (the ANE-style layout).
    _x("layer_norm", f32(2, 5, 6), axes=[-1], gamma=f32(6), beta=f32(6), epsilon=_F(1e-5)),
    _x("layer_norm", f32(2, 4, 1, 6), axes=[1], gamma=f32(4), beta=f32(4), epsilon=_F(1e-3)),
    _x("layer_norm", f32(2, 4, 3, 5), axes=[2, 3], gamma=f32(3, 5), beta=f32(3, 5)),
    _x("l2_norm", f32(2, 3, 4, 5), epsilon=_F(1e-6)),
    _x("linear", f32(2, 5, 4), weight=f32(3, 4), bias=f32(3)),
    _xy("matmul", f32(2, 1, 3, 4), f32(5, 4, 6)),
    _op("matmul", {"x": f32(2, 4, 3), "y": f32(2, 6, 4)}, transpose_x=True, transpose_y=True),
    _xy("matmul", f32(4), f32(4, 3)),
    pytest.param(lambda x, y: mb.einsum(values=(x, y), equation="nchw,nwhu->nchu"),
                 {"x": f32(2, 3, 4, 5), "y": f32(2, 5, 4, 6)}, iOS17, id="einsum"),
    *[
        _op("scaled_dot_product_attention", {"query": f32(2, 3, 5, 4), "key": f32(2, 3, 7, 4),
                                             "value": f32(2, 3, 7, 6)}, iOS18, **mask)
        for mask in [{}, {"attn_mask": RNG.random((5, 7)) > 0.3}, {"attn_mask": f32(1, 5, 7)}]
    ],
    # tensor ops
    _x("reshape", f32(2, 3, 4), shape=[0, -1, 2]),
    _x("transpose", f32(2, 3, 4), perm=[2, 0, 1]),
    _x("expand_dims", f32(2, 3), axes=[0, -1]),
    _x("squeeze", f32(1, 3, 1, 2), axes=[0, 2]),
    _x("squeeze", f32(1, 3, 1, 2)),
    pytest.param(lambda x, y: mb.concat(values=[x, y], axis=1), {"x": f32(2, 3), "y": f32(2, 4)}, iOS17, id="concat"),
    pytest.param(lambda x, y: mb.stack(values=[x, y], axis=1), {"x": f32(2, 3), "y": f32(2, 3)}, iOS17, id="stack"),
    _x("split", f32(4, 6), axis=1, num_splits=3),
    _x("split", f32(4, 6), axis=0, split_sizes=[1, 3]),
    _x("slice_by_index", f32(5, 6, 4), begin=[1, 0, 3], end=[4, 5, 0], stride=[2, 1, -1]),
    _x("slice_by_index", f32(5, 6, 4), begin=[1, 2, -1], end=[0, -1, 0], end_mask=[True, False, False],
       squeeze_mask=[False, False, True]),
    _x("slice_by_index", f32(5, 6), begin=[0, 0], end=[0, 0], stride=[-2, 1], begin_mask=[True, True],
       end_mask=[True, True]),
    _x("slice_by_size", f32(5, 6, 4), begin=[1, 2, 0], size=[3, -1, 2]),
    _x("gather", f32(4, 5, 3), indices=np.int32([[0, -1], [2, 4]]), axis=1),
    _x("gather", f32(4, 5, 3), indices=np.int32(2), axis=0),
    _x("gather", f32(2, 5, 3), iOS16, indices=i32(2, 4, hi=5), axis=1, batch_dims=1),
    _x("gather", f32(2, 3, 5, 2), iOS16, indices=i32(2, 4, hi=5), axis=2, batch_dims=1),
    _x("gather_along_axis", f32(3, 5), indices=i32(3, 2, hi=5), axis=1),
    _x("tile", f32(2, 3), reps=[2, 3]),
    _x("reverse", f32(2, 3, 4), axes=[0, 2]),
    _x("flatten2d", f32(2, 3, 4), axis=-1),
    _x("identity", f32(2, 3)),
    _x("pad", f32(2, 3, 4), pad=[1, 2, 0, 3], mode="constant", constant_val=_F(1.5)),
    _x("pad", f32(1, 2, 3, 4), pad=[1, 2, 2, 1], mode="reflect"),
    _x("pad", f32(1, 2, 3, 4), pad=[0, 2, 3, 1], mode="replicate"),
    _x("cast", _M * 3, dtype="int32"),
    _x("cast", i32(3, 4, lo=-3), dtype="fp32"),
    _x("cast", i32(3, 4, lo=-1, hi=2), dtype="bool"),
    _op("fill", {"shape": i32(3, lo=1, hi=4)}, value=_F(2.5)),
    _op("fill_like", {"ref_tensor": f32(2, 3)}, iOS16, value=_F(-1.0)),
    _x("shape", f32(2, 3, 4)),
    _op("select", {"cond": _B1, "a": f32(2, 3), "b": f32(1, 3)}),
    _x("band_part", f32(2, 4, 5), lower=np.int32(1), upper=np.int32(0)),
    _x("band_part", f32(4, 5), lower=np.int32(-1), upper=np.int32(2)),
    _x("cumsum", f32(3, 4, 2), axis=1, exclusive=False, reverse=False),
    _x("cumsum", f32(3, 4, 2), axis=-1, exclusive=False, reverse=True),
    _x("argsort", f32(3, 6), axis=-1, ascending=False),
    _x("argsort", f32(3, 6), axis=0, ascending=True),
    _x("topk", f32(3, 6), iOS16, k=2, axis=1),
    _x("topk", f32(3, 6), iOS16, k=3, axis=0, ascending=True),
    _x("non_zero", _M > 0),
    _x("slice_update", f32(5, 6), iOS18, update=f32(2, 3), begin=[1, 5], end=[5, 0], stride=[2, -2]),
    _x("slice_update", f32(4, 6), iOS18, update=f32(4), begin=[0, 2], end=[4, 3], squeeze_mask=[False, True]),
    _op("scatter_along_axis", {"data": f32(3, 5), "updates": f32(3, 2)}, indices=np.int32([[0, 4], [2, 3], [-1, 1]]),
        axis=1, mode="update"),
]


@pytest.mark.parametrize("build, data, opset", VI_CASES, ids=[f"{i:03d}-{p.id}" for i, p in enumerate(VI_CASES)])
def test_op_matches_coremltools_value_inference(build, data, opset):
    check(build, data, opset)


def test_range_1d_runs_at_load_and_matches_value_inference():
    check(lambda: mb.range_1d(end=np.int32(9), start=np.int32(1), step=np.int32(3)), {})
    check(lambda: mb.range_1d(end=np.float32(2.0), start=np.float32(-1.0), step=np.float32(0.5)), {})


def test_fp16_values_are_rounded_at_op_boundaries():
    x = np.float32([1.0, 1e-4, 3.14159265, 65504.0, 1.0 + 2**-12])

    def build(x):
        return mb.cast(x=mb.add(x=mb.cast(x=x, dtype="fp16"), y=np.float16(0.0)), dtype="fp32")

    rounded = execute(build, {"x": x})[0]
    np.testing.assert_array_equal(rounded, x.astype(np.float16).astype(np.float32))
    exact = execute(build, {"x": x}, fp16_rounding=False)[0]
    np.testing.assert_array_equal(exact, x)


# ---------------------------------------------------------------- NumPy references from the op docs
def np_conv(x, w, b, strides, pads, dilations, groups):
    """Direct convolution: out[n, o, p] = sum over window of x_padded * w (pads: per-dim (before, after))."""
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    n, _, *size = x.shape
    cout, cin_g, *k = w.shape
    out_size = [(s - (kk - 1) * d - 1) // st + 1 for s, kk, d, st in zip(size, k, dilations, strides)]
    out = np.zeros((n, cout, *out_size), np.float64)
    for o in range(cout):
        g = o // (cout // groups)
        for pos in np.ndindex(*out_size):
            window = tuple(
                slice(p * st, p * st + (kk - 1) * d + 1, d) for p, st, kk, d in zip(pos, strides, k, dilations)
            )
            patch = x[(slice(None), slice(g * cin_g, (g + 1) * cin_g), *window)]
            out[(slice(None), o, *pos)] = (patch * w[o]).reshape(n, -1).sum(1)
    return out + (0 if b is None else b.reshape(1, -1, *[1] * len(k)))


def doc_same_pads(size, k, stride, dilation, lower):
    """conv docs: output ceil(size / stride); the odd leftover goes after (same) or before (same_lower)."""
    eff = (k - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + eff - size, 0)
    return (math.ceil(total / 2), total // 2) if lower else (total // 2, math.ceil(total / 2))


@pytest.mark.parametrize(
    "shape, wshape, strides, pad_type, pad, dilations, groups",
    [
        ((1, 3, 7, 6), (4, 3, 3, 3), [1, 1], "valid", None, [1, 1], 1),
        ((2, 3, 7, 6), (4, 3, 3, 3), [2, 2], "same", None, [1, 1], 1),
        ((1, 2, 7, 6), (3, 2, 4, 2), [2, 3], "same_lower", None, [1, 1], 1),
        ((1, 4, 9, 8), (6, 2, 3, 3), [1, 2], "custom", [1, 2, 0, 1], [2, 1], 2),
        ((1, 3, 10), (5, 3, 3), [2], "custom", [2, 0], [1], 1),
    ],
)
def test_conv_matches_direct_convolution(shape, wshape, strides, pad_type, pad, dilations, groups):
    x, w, b = f32(*shape), f32(*wshape), f32(wshape[0])
    if pad_type == "custom":
        pads = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(strides))]
    elif pad_type == "valid":
        pads = [(0, 0)] * len(strides)
    else:
        pads = [
            doc_same_pads(shape[2 + i], wshape[2 + i], strides[i], dilations[i], pad_type == "same_lower")
            for i in range(len(strides))
        ]
    attrs = dict(strides=strides, pad_type=pad_type, dilations=dilations, groups=groups)
    if pad is not None:
        attrs["pad"] = pad
    ref = np_conv(x, w, b, strides, pads, dilations, groups)
    check(lambda x: mb.conv(x=x, weight=w, bias=b, **attrs), {"x": x}, ref=ref, atol=1e-4)


def test_conv_transpose_matches_scatter_definition():
    x, w, b = f32(1, 3, 4, 5), f32(3, 2, 3, 3), f32(2)
    full = np.zeros((1, 2, (4 - 1) * 2 + 3, (5 - 1) * 2 + 3))
    for i, j in np.ndindex(4, 5):  # every input pixel scatters a weighted kernel at stride 2
        full[0, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] += np.einsum("c,cokl->okl", x[0, :, i, j], w)
    ref = full[:, :, 1:-2, 0:] + b.reshape(1, -1, 1, 1)
    build = lambda x: mb.conv_transpose(x=x, weight=w, bias=b, strides=[2, 2], pad_type="custom", pad=[1, 2, 0, 0])  # noqa: E731
    check(build, {"x": x}, ref=ref, atol=1e-4)


def np_pool(x, k, s, pads, reduce, pad_value):
    xp = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=pad_value)
    oh, ow = (xp.shape[2] - k[0]) // s[0] + 1, (xp.shape[3] - k[1]) // s[1] + 1
    return np.stack(
        [reduce(xp[:, :, i * s[0] : i * s[0] + k[0], j * s[1] : j * s[1] + k[1]]) for i in range(oh) for j in range(ow)],
        axis=-1,
    ).reshape(*x.shape[:2], oh, ow)


def test_pools_match_window_definitions():
    x = f32(2, 3, 7, 6)
    pads = [(1, 0), (1, 1)]
    common = dict(kernel_sizes=[3, 2], strides=[2, 1], pad_type="custom", pad=[1, 0, 1, 1])
    maxref = np_pool(x, [3, 2], [2, 1], pads, lambda p: p.max((2, 3)), -np.inf)
    check(lambda x: mb.max_pool(x=x, **common), {"x": x}, ref=maxref)
    with_pad = np_pool(x, [3, 2], [2, 1], pads, lambda p: p.mean((2, 3)), 0.0)
    check(lambda x: mb.avg_pool(x=x, exclude_padding_from_average=False, **common), {"x": x}, ref=with_pad)
    real = np_pool(np.ones_like(x), [3, 2], [2, 1], pads, lambda p: p.sum((2, 3)), 0.0)
    sums = np_pool(x, [3, 2], [2, 1], pads, lambda p: p.sum((2, 3)), 0.0)
    check(lambda x: mb.avg_pool(x=x, exclude_padding_from_average=True, **common), {"x": x}, ref=sums / real)


def test_normalizations_and_silu_match_formulas():
    x, g, b = f32(2, 3, 4, 5), f32(3), f32(3)
    mean, var = x.mean((2, 3), keepdims=True), x.var((2, 3), keepdims=True)
    ref = (x - mean) / np.sqrt(var + 1e-5) * g.reshape(1, 3, 1, 1) + b.reshape(1, 3, 1, 1)
    check(lambda x: mb.instance_norm(x=x, gamma=g, beta=b, epsilon=np.float32(1e-5)), {"x": x}, ref=ref, atol=1e-4)
    m, v = f32(3), f32(3, lo=0.5, hi=2)
    ref = (x - m.reshape(1, 3, 1, 1)) / np.sqrt(v.reshape(1, 3, 1, 1) + 1e-3) * g.reshape(1, 3, 1, 1) + b.reshape(
        1, 3, 1, 1
    )
    build = lambda x: mb.batch_norm(x=x, mean=m, variance=v, gamma=g, beta=b, epsilon=np.float32(1e-3))  # noqa: E731
    check(build, {"x": x}, ref=ref, atol=1e-4)
    check(lambda x: mb.silu(x=x), {"x": x}, ref=x / (1 + np.exp(-x.astype(np.float64))))


# Grid points printed in the resize_bilinear / upsample_bilinear docs for Xin = 2 (input values [0, 1],
# so the interpolated output equals the sampling grid).
DOC_GRIDS = {
    ("STRICT_ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
    ("ALIGN_CORNERS", 6): [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
    ("DEFAULT", 5): [0.0, 0.4, 0.8, 1.0, 1.0],
    ("DEFAULT", 6): [0.0, 0.33, 0.67, 1.0, 1.0, 1.0],
    ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
    ("OFFSET_CORNERS", 6): [0.08, 0.25, 0.42, 0.58, 0.75, 0.92],
    ("UNALIGN_CORNERS", 5): [0.0, 0.1, 0.5, 0.9, 1.0],
    ("UNALIGN_CORNERS", 6): [0.0, 0.0, 0.33, 0.67, 1.0, 1.0],
}


@pytest.mark.parametrize("mode, n", list(DOC_GRIDS), ids=[f"{m}-{n}" for m, n in DOC_GRIDS])
def test_bilinear_resizes_sample_the_documented_grid(mode, n):
    x = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)  # (1, 2, 2): same row twice
    want = np.tile(np.array(DOC_GRIDS[mode, n], np.float32), (1, 2, 1))
    check(lambda x: mb.resize_bilinear(x=x, target_size_height=2, target_size_width=n, sampling_mode=mode),
          {"x": x}, ref=want, atol=0.006)
    check(lambda x: mb.resize(x=x, shape=np.int32([2, n]), resized_dims=np.uint32(2), sampling_mode=mode),
          {"x": x}, ref=want, atol=0.006)
    if mode in ("STRICT_ALIGN_CORNERS", "UNALIGN_CORNERS"):
        build = lambda x: mb.upsample_bilinear(  # noqa: E731
            x=x, scale_factor_height=1.0, scale_factor_width=n / 2, align_corners=mode == "STRICT_ALIGN_CORNERS"
        )
        check(build, {"x": x}, ref=want, atol=0.006)


@pytest.mark.parametrize("mode", ["add", "sub", "mul", "div", "max", "min"])
def test_scatter_along_axis_modes_follow_the_docs(mode):
    # coremltools' value inference implements only mode="update"; combine by the documented rule,
    # duplicates (row 1 hits column 2 twice) included.
    data, updates, idx = f32(3, 5), f32(3, 2, lo=0.5, hi=2), np.int32([[0, 4], [2, 2], [-1, 1]])
    combine = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "max": np.maximum,
               "min": np.minimum}[mode]
    ref = data.astype(np.float64).copy()
    for i, j in np.ndindex(*idx.shape):
        ref[i, idx[i, j] % 5] = combine(ref[i, idx[i, j] % 5], updates[i, j])
    build = lambda d, u: mb.scatter_along_axis(data=d, indices=idx, updates=u, axis=1, mode=mode)  # noqa: E731
    check(build, {"d": data, "u": updates}, ref=ref)


def test_crop_trims_the_last_two_dims():
    x = f32(2, 3, 7, 6)
    check(lambda x: mb.crop(x=x, crop_height=[1, 2], crop_width=[0, 3]), {"x": x}, ref=x[:, :, 1:5, 0:3])


def test_nearest_neighbor_resampling():
    x = f32(1, 2, 3, 4)
    ref = np.repeat(np.repeat(x, 2, axis=2), 3, axis=3)
    check(lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3), {"x": x}, ref=ref)
    rows, cols = np.floor(np.arange(5) * 3 / 5).astype(int), np.floor(np.arange(7) * 4 / 7).astype(int)
    ref = x[:, :, rows][:, :, :, cols]
    check(lambda x: mb.resize_nearest_neighbor(x=x, target_size_height=5, target_size_width=7), {"x": x}, ref=ref)


def test_index_and_layout_ops_match_numpy():
    # coremltools' value inference ignores `interleave` and breaks on exclusive cumsum: NumPy from the docs.
    a, b = f32(3, 2), f32(3, 2)
    inter = np.empty((9, 2), np.float32)
    inter[0::3], inter[1::3], inter[2::3] = a, b, a
    check(lambda x, y: mb.concat(values=[x, y, x], axis=0, interleave=True), {"x": a, "y": b}, ref=inter)
    c = f32(3, 4, 2)
    excl = np.cumsum(c, axis=1) - c
    check(lambda x: mb.cumsum(x=x, axis=1, exclusive=True), {"x": c}, ref=excl)
    rev_excl = np.flip(np.cumsum(np.flip(c, 1), axis=1), 1) - c
    check(lambda x: mb.cumsum(x=x, axis=1, exclusive=True, reverse=True), {"x": c}, ref=rev_excl)
    x = f32(3, 4, 5)
    idx = np.array([[[0, 1], [2, 3]], [[1, -1], [0, 0]]], np.int32)
    check(lambda x: mb.gather_nd(x=x, indices=idx), {"x": x}, ref=x[idx[..., 0], idx[..., 1]])
    ind = np.array([[0, 2], [1, 1], [2, 0]], np.int32)
    check(lambda i: mb.one_hot(indices=i, one_hot_vector_size=4, axis=1, on_value=np.float32(5.0),
                               off_value=np.float32(-1.0)), {"i": ind},
          ref=np.where(np.arange(4)[None, :, None] == ind[:, None, :], 5.0, -1.0))
    y, b = f32(1, 8, 2, 3), 2
    # TF DCR order: output channel c at block offset (i, j) reads input channel (i * b + j) * C' + c.
    d2s = y.reshape(1, b, b, 2, 2, 3).transpose(0, 3, 4, 1, 5, 2).reshape(1, 2, 4, 6)
    check(lambda x: mb.depth_to_space(x=x, block_size=b), {"x": y}, ref=d2s)
    check(lambda x: mb.space_to_depth(x=x, block_size=b), {"x": d2s}, ref=y)
    ps = y.reshape(1, 2, b, b, 2, 3).transpose(0, 1, 4, 2, 5, 3).reshape(1, 2, 4, 6)  # CRD (torch PixelShuffle)
    check(lambda x: mb.pixel_shuffle(x=x, upscale_factor=b), {"x": y}, ref=ps)


# ---------------------------------------------------------------- compressed weights
def _pack_lsb_first(values, nbits):
    bits = ((values[:, None] >> np.arange(nbits)) & 1).reshape(-1)
    return np.packbits(np.pad(bits, (0, -len(bits) % 8)), bitorder="little")


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_lut_to_dense_ios16_unpacks_lsb_first(nbits):
    idx = RNG.integers(0, 2**nbits, 35)
    lut = f32(2**nbits).astype(np.float16)
    build = lambda: mb.constexpr_lut_to_dense(  # noqa: E731
        indices=_pack_lsb_first(idx, nbits), lut=lut, shape=np.uint32([5, 7])
    )
    check(build, {}, iOS16, ref=lut[idx].reshape(5, 7))
    check(build, {}, iOS16)  # and coremltools' own decompression agrees


@pytest.mark.parametrize(
    "ishape, lshape, axis",
    [((6, 2), (2, 1, 4, 1), None), ((4, 6), (1, 3, 16, 1), None), ((2, 2, 2), (1, 1, 1, 2, 3), 1)],
)
def test_lut_to_dense_ios18_grouped_and_vector(ishape, lshape, axis):
    dtype = {2: types.np_uint1_dtype, 4: types.np_uint2_dtype, 16: types.np_uint4_dtype}[lshape[-2]]
    idx = RNG.integers(0, lshape[-2], ishape).astype(dtype)
    lut = f32(*lshape).astype(np.float16)
    attrs = {} if axis is None else {"vector_axis": np.int32(axis)}
    check(lambda: mb.constexpr_lut_to_dense(indices=idx, lut=lut, **attrs), {}, iOS18)


def test_dequantizing_constexprs_match_coremltools():
    q = RNG.integers(-128, 127, (4, 6)).astype(np.int8)
    s4, s23, zp = f32(4, lo=0.1, hi=1), f32(2, 3, lo=0.1, hi=1), np.int8([1, -2, 0, 3])
    build = lambda: mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=s4, axis=np.int32(0))  # noqa: E731
    check(build, {}, iOS16, ref=(q - zp[:, None].astype(np.float32)) * s4[:, None])
    check(build, {}, iOS16)
    offset = np.int8([[1, 2, 3], [0, -1, -2]])
    check(lambda: mb.constexpr_blockwise_shift_scale(data=q, scale=s23, offset=offset), {}, iOS18)
    half = f32(3, 2).astype(np.float16)
    check(lambda: mb.constexpr_cast(source_val=half, output_dtype="fp32"), {}, iOS16)
    mask = RNG.random((4, 5)) > 0.5
    data = f32(int(mask.sum())).astype(np.float16)
    check(lambda: mb.constexpr_sparse_to_dense(nonzero_data=data, mask=mask.astype(types.np_uint1_dtype)), {}, iOS18)
    packed = np.packbits(mask.reshape(-1), bitorder="little")
    check(lambda: mb.constexpr_sparse_to_dense(nonzero_data=data, mask=packed, shape=np.uint32([4, 5])), {}, iOS16)


def test_quantize_and_dequantize_ios17():
    x, s = f32(3, 4), f32(3, lo=0.01, hi=0.05)
    check(lambda x: mb.quantize(input=x, scale=s, zero_point=np.int8([0, 1, -1]), axis=np.int32(0),
                                output_dtype="int8"), {"x": x})
    q = RNG.integers(-100, 100, (3, 4)).astype(np.int8)
    ref = (q.astype(np.float32) - np.float32([0, 1, -1])[:, None]) * s[:, None]
    # Int8 placeholders are not a MIL input type, so the quantized data is a const here.
    check(lambda: mb.dequantize(input=q, scale=s, zero_point=np.int8([0, 1, -1]), axis=np.int32(0)), {}, ref=ref)
