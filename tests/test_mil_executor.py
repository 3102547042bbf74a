"""Whole-package checks of the MIL reference executor: tiny SD modules converted with coremltools,
saved, read back from disk and run on Linux, compared with their PyTorch source.

Each tiny model is converted once per module (fixture cache). The default set covers both
deployment targets and both precisions and, between them, every op type that the full
{macOS14, macOS15} x {fp16, fp32} matrix produces; MLSD_COREML_FULL=1 runs the full matrix.
"""

from __future__ import annotations

import copy
import math
import os
import time

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program, types  # noqa: E402

from mlsd.coreml import (  # noqa: E402
    OPS,
    Executor,
    InputMismatchError,
    OpFailedError,
    ProgramLoadError,
    UnsupportedOpError,
    load_program,
    supported_op_types,
)
from mlsd.coreml.testing import compare, psnr  # noqa: E402

M14, M15 = ct.target.macOS14, ct.target.macOS15
FP16, FP32 = ct.precision.FLOAT16, ct.precision.FLOAT32
DEFAULT_CASES = [("unet", M15, FP16), ("decoder", M14, FP32), ("encoder", M14, FP16), ("clip", M15, FP16)]
FULL_CASES = [(m, t, p) for m in ("unet", "decoder", "encoder", "clip") for t in (M14, M15) for p in (FP16, FP32)]
CASES = FULL_CASES if os.environ.get("MLSD_COREML_FULL") == "1" else DEFAULT_CASES
SEED = 1234


def case_id(case):
    model, target, precision = case
    return f"{model}-{target.name}-{'fp16' if precision == FP16 else 'fp32'}"


def build_module(model: str, seed: int = SEED) -> torch.nn.Module:
    """The brief's tiny configurations, wrapped so every input is a plain float tensor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if model == "unet":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
            attention_head_dim=4, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        wrapped = Wrap(lambda x, t, c: unet(x, t, encoder_hidden_states=c, return_dict=False)[0], unet)
    elif model in ("decoder", "encoder"):
        vae = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=32, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        if model == "decoder":
            wrapped = Wrap(lambda z: vae.decode(z, return_dict=False)[0], vae)
        else:
            wrapped = Wrap(lambda x: vae.encode(x, return_dict=False)[0].mean, vae)
    else:
        cfg = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                             vocab_size=49408, max_position_embeddings=77)
        clip = CLIPTextModel(cfg)

        def encode(ids):
            ids = ids.to(torch.int32)
            # Explicit position ids: CLIP's sliced position buffer exports as aten.alias, which
            # coremltools' torch.export frontend does not convert.
            return clip(ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), return_dict=False)[0]

        wrapped = Wrap(encode, clip)
    return wrapped.eval()


class Wrap(torch.nn.Module):
    def __init__(self, fn, inner):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args):
        return self.fn(*args)


def example_inputs(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if model == "unet":
        return {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([10.0 + 500 * seed]),
                "encoder_hidden_states": torch.randn(1, 8, 64, generator=g)}
    if model == "decoder":
        return {"z": torch.randn(1, 4, 8, 8, generator=g)}
    if model == "encoder":
        return {"image": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1}
    return {"input_ids": torch.randint(0, 49408, (1, 77), generator=g).float()}


def convert(module, inputs: dict[str, torch.Tensor], target, precision, fp32_inputs=False):
    example = tuple(inputs.values())
    with torch.no_grad():
        exported = torch.export.export(module, example).run_decompositions({})
    # fp16 packages default to fp16 inputs, which cannot hold token ids above 2048 exactly.
    dtype = np.float32 if fp32_inputs else None
    return ct.convert(exported, convert_to="mlprogram", minimum_deployment_target=target, compute_precision=precision,
                      inputs=[ct.TensorType(name=n, shape=v.shape, dtype=dtype) for n, v in inputs.items()])


def passes_gate(got, ref, precision) -> bool:
    if precision == FP16:
        return psnr(got, ref) >= 35.0
    return float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def torch_forward(module, inputs):
    with torch.inference_mode():
        return module(*inputs.values()).numpy().astype(np.float64)


@pytest.fixture(scope="module")
def modules():
    return {m: build_module(m) for m in ("unet", "decoder", "encoder", "clip")}


@pytest.fixture(scope="module")
def packages(tmp_path_factory, modules):
    """Factory: (model, target, precision) -> saved .mlpackage path, converted once per module."""
    root, cache = tmp_path_factory.mktemp("mlpackages"), {}

    def get(case):
        if case not in cache:
            model, target, precision = case
            path = root / f"{case_id(case)}.mlpackage"
            convert(modules[model], example_inputs(model), target, precision, fp32_inputs=model == "clip").save(str(path))
            cache[case] = path
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_package_matches_pytorch_source(case, packages, modules):
    model, _, precision = case
    executor = Executor(packages(case))
    inputs = example_inputs(model)
    ref = torch_forward(modules[model], inputs)
    start = time.perf_counter()
    got = next(iter(executor.run({k: v.numpy() for k, v in inputs.items()}).values())).astype(np.float64)
    exec_s = time.perf_counter() - start
    start = time.perf_counter()
    torch_forward(modules[model], inputs)
    torch_s = time.perf_counter() - start
    stats = compare(got, ref)
    print(f"\n{case_id(case)}: PSNR {stats['psnr_db']:.1f} dB, max abs err {stats['max_abs']:.2e} "
          f"(|ref| max {stats['ref_max_abs']:.2f}); executor {exec_s * 1e3:.0f} ms vs torch {torch_s * 1e3:.0f} ms")
    assert got.shape == ref.shape
    assert passes_gate(got, ref, precision), stats

    # Negative controls: another input gives clearly different outputs, and a differently seeded
    # module of the same architecture fails the same gate.
    other = example_inputs(model, seed=1)
    moved = next(iter(executor.run({k: v.numpy() for k, v in other.items()}).values()))
    assert psnr(moved, ref) < 20.0
    assert not passes_gate(got, torch_forward(build_module(model, SEED + 1), inputs), precision)


def test_every_op_type_in_the_converted_packages_is_supported(packages):
    seen: set[str] = set()
    for case in CASES:
        seen |= set(load_program(packages(case)).op_types())
    print(f"\nop types in the tiny packages ({len(seen)}): {', '.join(sorted(seen))}")
    # Guard against a vacuous pass: these must have shown up.
    assert {"conv", "linear", "layer_norm", "matmul", "softmax", "scaled_dot_product_attention", "gather",
            "upsample_nearest_neighbor", "cast", "select"} <= seen
    assert seen <= supported_op_types(), sorted(seen - supported_op_types())


# ---------------------------------------------------------------- small conv net: palettization,
# multifunction packages, input validation
class TinyConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 16, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.nn.functional.silu(self.conv1(x)))


@pytest.fixture(scope="module")
def tiny():
    return TinyConv().eval()


def _lut_weights(program) -> dict[tuple, np.ndarray]:
    """Dense weights rebuilt with NumPy straight from each LUT + indices in the package."""
    weights = {}
    for op in program.operations():
        if op.op_type != "constexpr_lut_to_dense":
            continue
        lut, indices = op.inputs["lut"].val, op.inputs["indices"].val
        if "shape" in op.inputs:  # iOS16: indices bit-packed LSB first
            shape = tuple(int(s) for s in op.inputs["shape"].val)
            nbits = int(np.log2(lut.size))
            bits = np.unpackbits(indices, bitorder="little")[: nbits * math.prod(shape)].reshape(-1, nbits)
            dense = lut[(bits.astype(np.int64) << np.arange(nbits)).sum(1)].reshape(shape)
        else:  # iOS18, per-tensor: one palette, scalar entries
            assert lut.size == 64
            dense = lut.reshape(-1)[indices.astype(np.int64)]
        weights[dense.shape] = dense.astype(np.float32)
    return weights


@pytest.mark.parametrize("target", [M14, M15], ids=["ios16-lut", "ios18-lut"])
def test_palettized_package_runs_the_dequantized_weights(tiny, tmp_path, target):
    pytest.importorskip("sklearn")
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    mlmodel = convert(tiny, {"x": x}, target, FP32)
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=6))
    path = tmp_path / "palettized.mlpackage"
    palettize_weights(mlmodel, config).save(str(path))

    program = load_program(path)
    dense = _lut_weights(program)
    assert set(dense) == {tuple(tiny.conv1.weight.shape), tuple(tiny.conv2.weight.shape)}
    dequantized = copy.deepcopy(tiny)
    for conv in (dequantized.conv1, dequantized.conv2):
        w = dense[tuple(conv.weight.shape)]
        assert len(np.unique(w)) <= 64
        conv.weight.data = torch.from_numpy(w)

    got = Executor(program).run({"x": x.numpy()})
    got = next(iter(got.values())).astype(np.float64)
    ref_dq, ref_orig = torch_forward(dequantized, {"x": x}), torch_forward(tiny, {"x": x})
    scale = max(1.0, float(np.abs(ref_dq).max()))
    assert np.abs(got - ref_dq).max() <= 1e-5 * scale
    # 6-bit weights move the output a little, far more than the executor's own error.
    assert np.abs(got - ref_orig).max() > 100 * np.abs(got - ref_dq).max()
    assert psnr(got, ref_orig) > 25.0


@pytest.fixture(scope="module")
def multifunction(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("multifunction")
    desc = ct.utils.MultiFunctionDescriptor()
    for name, size in (("small", 6), ("large", 10)):
        path = root / f"{name}.mlpackage"
        convert(tiny, {"x": torch.zeros(1, 8, size, size)}, M15, FP32).save(str(path))
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = "small"
    out = root / "both.mlpackage"
    ct.utils.save_multifunction(desc, str(out))
    return out


def test_multifunction_package_runs_each_function(multifunction, tiny):
    program = load_program(multifunction)
    assert set(program.functions) == {"small", "large"} and program.function_name == "small"
    for name, size in (("small", 6), ("large", 10)):
        x = torch.randn(1, 8, size, size)
        executor = Executor(multifunction, name)
        assert executor.inputs["x"].shape == (1, 8, size, size)
        got = next(iter(executor.run({"x": x.numpy()}).values()))
        np.testing.assert_allclose(got, torch_forward(tiny, {"x": x}), rtol=1e-5, atol=1e-5)
    with pytest.raises(ProgramLoadError, match="large"):
        load_program(multifunction, "medium")


def test_inputs_are_validated_before_running(multifunction):
    executor = Executor(multifunction, "small")
    good = np.zeros((1, 8, 6, 6), np.float32)
    with pytest.raises(InputMismatchError, match=r"missing \['x'\]"):
        executor.run({"y": good})
    with pytest.raises(InputMismatchError, match=r"unexpected \['extra'\]"):
        executor.run({"x": good, "extra": good})
    with pytest.raises(InputMismatchError, match=r"'x' has shape \(1, 8, 5, 6\).*expects \(1, 8, 6, 6\)"):
        executor.run({"x": np.zeros((1, 8, 5, 6), np.float32)})
    with pytest.raises(InputMismatchError, match=r"'x' has dtype int32.*expects fp32"):
        executor.run({"x": good.astype(np.int32)})
    assert isinstance(InputMismatchError("x"), ValueError)
    executor.run({"x": torch.zeros(1, 8, 6, 6, dtype=torch.float64)})  # any float width is accepted
    with pytest.raises(ProgramLoadError, match="not found"):
        Executor(multifunction.parent / "missing.mlpackage")


def _sin_program():
    with Function({"x": mb.placeholder(shape=(2, 3), dtype=types.fp32)}, opset_version=ct.target.iOS17) as fn:
        fn.set_outputs([mb.add(x=mb.sin(x=fn.inputs["x"], name="the_sine"), y=np.float32(1.0))])
    prog = Program()
    prog.add_function("main", fn)
    return prog


def test_unknown_ops_fail_at_load_naming_type_and_op():
    without_sin = {k: v for k, v in OPS.items() if k != "sin"}
    with pytest.raises(UnsupportedOpError, match=r"sin \('the_sine'\)") as info:
        Executor(_sin_program(), ops=without_sin)
    assert isinstance(info.value, NotImplementedError)
    assert "add (" not in str(info.value)
    Executor(_sin_program()).run({"x": np.zeros((2, 3), np.float32)})  # the full registry runs it

    with Function({}, opset_version=ct.target.iOS17) as fn:
        fn.set_outputs([mb.random_uniform(shape=np.int32([2, 2]), name="dice")])
    prog = Program()
    prog.add_function("main", fn)
    with pytest.raises(UnsupportedOpError, match=r"random_uniform \('dice'\)"):
        Executor(prog)


def test_an_op_producing_the_wrong_shape_is_reported_by_name():
    broken = dict(OPS, sin=lambda x: x[:1])
    with pytest.raises(OpFailedError, match=r"sin 'the_sine' produced shape \(1, 3\).*\(2, 3\)"):
        Executor(_sin_program(), ops=broken).run({"x": np.zeros((2, 3), np.float32)})
