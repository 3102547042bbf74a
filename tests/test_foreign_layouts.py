"""Core ML models converted elsewhere run as they are: Apple's torch2coreml folders, Hugging Face apple/coreml-*
repositories and Swift / MochiDiffusion Resources folders.

The folders are built once per session from one tiny checkpoint converted by mlsd at Apple's deployment target
(iOS16 / macOS13: opset CoreML6, split_einsum attention), then reshaped the way Apple's tools shape them: the
UNet bisected by coremltools' `bisect_model` (Apple's chunker: fp16 tensors cross as fp32 casts), 6-bit iOS16 LUT
palettization, Apple's file names, a safety checker, compiled (.mlmodelc) siblings, a ControlNet-ready UNet with
`additional_residual_*` inputs. They must generate the image mlsd's own bundle of the same weights generates.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mlsd.backends.coreml_backend import CoreMLBackend
from mlsd.cli import main
from mlsd.coreml import Executor, load_program, supported_op_types
from mlsd.coreml.layouts import (
    APPLE,
    HF_REPO,
    RESOURCES,
    describe_folder,
    read_layout,
    read_package,
    recognise,
)
from mlsd.errors import InputFileError, UsageError
from mlsd.pipeline.generate import run
from mlsd.pipeline.request import GenerationRequest
from mlsd.session import LoraChoice, ModelKey, choose_backend
from tests.generation_helpers import psnr

PREFIX = "Stable_Diffusion_version_tiny_sd1"
GATE = 30.0
APPLE_PARTS = {"TextEncoder": "text_encoder", "VAEDecoder": "vae_decoder", "VAEEncoder": "vae_encoder"}


def _request(**kw):
    base = dict(prompt="a red circle", negative_prompt="blue", steps=3, cfg_scale=7.0, seed=11, width=64,
                height=64, sampler="Euler a")
    return GenerationRequest(**(base | kw))


# ----------------------------------------------------------------------------- building the folders
def _bisect(package: Path, out: Path) -> tuple[Path, Path]:
    """Apple's chunker (coremltools' bisect_model): `<stem>_chunk1/2.mlpackage` beside each other."""
    import coremltools as ct

    ct.models.utils.bisect_model(str(package), str(out), check_output_correctness=False)
    return out / f"{package.stem}_chunk1.mlpackage", out / f"{package.stem}_chunk2.mlpackage"


def _apple_unet(bundle: Path, out: Path) -> Path:
    """The bundle's UNet converted as Apple's torch2coreml does: an fp32 torch graph that Core ML lowers to fp16
    itself (mlsd's own converter exports an fp16 graph, whose op order bisect_model does not expect)."""
    import json

    import numpy as np
    import torch

    from converters.coreml.ane.unet import AneUNet
    from converters.coreml.export import to_mlprogram
    from converters.coreml.unet import unet_example_inputs
    from mlsd.checkpoints.load import load_model

    source = load_model(Path(json.loads((bundle / "mlsd.json").read_text())["source"]["path"])).unet
    examples = unet_example_inputs(source.config, (8, 8))
    model = to_mlprogram(AneUNet.from_diffusers(source), examples, input_dtypes={k: np.float16 for k in examples},
                         output_names=["noise_pred"], output_dtypes={"noise_pred": np.float32},
                         minimum_target=__import__("coremltools").target.iOS16)
    assert next(iter(examples.values())).dtype == torch.float32
    model.save(str(out))
    return out


def _palettize(package: Path, out: Path) -> Path:
    import coremltools as ct

    from converters.coreml.quantize import palettize

    palettize(ct.models.MLModel(str(package), skip_model_load=True), 6).save(str(out))
    return out


def _fake_compiled(package: Path, out: Path) -> Path:
    """An .mlmodelc as Xcode's compiler lays it out (metadata.json, model.mil, weights); Linux cannot compile."""
    info = read_package(package)
    dtypes = {"fp16": "Float16", "fp32": "Float32", "int32": "Int32"}

    def schema(io):
        return [{"name": n, "shape": str(list(s)), "dataType": dtypes[d], "type": "MultiArray"}
                for n, (s, d) in io.items()]

    (out / "weights").mkdir(parents=True)
    (out / "weights" / "weight.bin").write_bytes(b"\0" * 64)
    (out / "coremldata.bin").write_bytes(b"\0" * 16)
    (out / "metadata.json").write_text(json.dumps([{"inputSchema": schema(info.inputs),
                                                    "outputSchema": schema(info.outputs),
                                                    "specificationVersion": 7}]))
    (out / "model.mil").write_text("program(1.0)\n" + "\n".join(
        f"    tensor<fp16, [1]> v{i} = {op}(x = v)[name = string(\"v{i}\")];" for i, op in
        enumerate(sorted(info.op_types))))
    return out


def _safety_checker(out: Path) -> Path:
    """Apple's safety checker I/O (clip_input, images -> filtered_images, has_nsfw_concepts), tiny."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec((1, 3, 8, 8)), mb.TensorSpec((1, 8, 8, 3))],
                opset_version=ct.target.iOS16)
    def prog(clip_input, images):
        return (mb.mul(x=images, y=1.0, name="filtered_images"),
                mb.reduce_max(x=clip_input, axes=[1, 2, 3], name="has_nsfw_concepts"))

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
               skip_model_load=True).save(str(out))
    return out


def _controlled_unet(package: Path, out: Path) -> Path:
    """A ControlNet-ready UNet as Apple converts one: an `additional_residual_0` input added to the first
    convolution's output (the first skip connection), fp16 like the rest of the program."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Placeholder, types

    program = load_program(package).program
    fn = program.functions["main"]
    fn.operations = list(fn.operations)
    conv = next(op for op in fn.operations if op.op_type == "conv")
    following = fn.operations[fn.operations.index(conv) + 1]
    with fn:
        fed = Placeholder(conv.outputs[0].shape, dtype=types.fp16, name="additional_residual_0").outputs[0]
        fn._input_dict["additional_residual_0"] = fed
        fn.function_inputs = tuple(fn._input_dict.values())
        added = mb.add(x=conv.outputs[0], y=fed, before_op=following, name="conv_in_with_residual")
        fn.replace_uses_of_var_after_op(anchor_op=added.op, old_var=conv.outputs[0], new_var=added)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True,
                       pass_pipeline=ct.PassPipeline(["common::dead_code_elimination"], pipeline_name="surgery"))
    model.save(str(out))
    return out


def _stand_ins(out: Path, *, width: int, channels: int, latent: int, original: bool) -> Path:
    """Spec-only stand-ins with a real model's I/O (never run): recognising family, inpainting, size and
    attention needs only shapes and op types, and full-size packages would be gigabytes."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    target = ct.target.iOS16
    out.mkdir(parents=True)

    def save(prog, role):
        ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target, skip_model_load=True).save(
            str(out / f"{PREFIX}_{role}.mlpackage"))

    @mb.program(input_specs=[mb.TensorSpec((1, 77))], opset_version=target)
    def te(input_ids):
        hidden = mb.tile(x=mb.expand_dims(x=input_ids, axes=[2]), reps=[1, 1, width], name="last_hidden_state")
        return hidden, mb.reduce_mean(x=hidden, axes=[1], name="pooled_outputs")

    @mb.program(input_specs=[mb.TensorSpec((2, channels, latent, latent)), mb.TensorSpec((2,)),
                             mb.TensorSpec((2, width, 1, 77))], opset_version=target)
    def unet(sample, timestep, encoder_hidden_states):
        flat = mb.reshape(x=encoder_hidden_states, shape=[2, width, 77])
        if original:  # Apple's original attention: batched matmuls, softmax over the last axis
            weights = mb.softmax(x=mb.matmul(x=flat, y=flat, transpose_x=True), axis=-1)
            axes = [1, 2]
        else:  # split_einsum: per-head einsums, softmax over axis 1 (the keys)
            q = mb.reshape(x=flat, shape=[2, width, 1, 77])
            k = mb.transpose(x=q, perm=[0, 3, 2, 1])
            weights = mb.softmax(x=mb.einsum(values=(k, q), equation="bkhc,bchq->bkhq"), axis=1)
            axes = [1, 2, 3]
        bias = mb.reshape(x=mb.reduce_mean(x=weights, axes=axes), shape=[2, 1, 1, 1])
        noise = mb.slice_by_size(x=sample, begin=[0, 0, 0, 0], size=[2, 4, latent, latent])
        return mb.add(x=mb.add(x=noise, y=bias), y=mb.reshape(x=timestep, shape=[2, 1, 1, 1]), name="noise_pred")

    @mb.program(input_specs=[mb.TensorSpec((1, 4, latent, latent))], opset_version=target)
    def dec(z):
        rgb = mb.slice_by_size(x=z, begin=[0, 0, 0, 0], size=[1, 3, latent, latent])
        return mb.upsample_nearest_neighbor(x=rgb, scale_factor_height=8, scale_factor_width=8, name="image")

    for prog, role in ((te, "text_encoder"), (unet, "unet"), (dec, "vae_decoder")):
        save(prog, role)
    return out


@pytest.fixture(scope="session")
def foreign(tiny_bundles, tmp_path_factory) -> dict[str, Path]:
    """bundle: mlsd's own (iOS16); bundle_q6: the same with the 6-bit UNet; the foreign folders built from them."""
    from mlsd.families import tokenizer_dir

    bundle = tiny_bundles("sd1-ios16", chunks=1, min_target="iOS16")
    root = tmp_path_factory.mktemp("foreign")
    f = {"bundle": bundle}

    # Apple's torch2coreml output folder: full UNet plus its bisected chunks, and a safety checker.
    apple = root / "apple"
    apple.mkdir()
    for mlsd_name, role in APPLE_PARTS.items():
        shutil.copytree(bundle / f"{mlsd_name}.mlpackage", apple / f"{PREFIX}_{role}.mlpackage")
    unet = _apple_unet(bundle, apple / f"{PREFIX}_unet.mlpackage")
    _bisect(unet, apple)
    _safety_checker(apple / f"{PREFIX}_safety_checker.mlpackage")
    f["apple"] = apple

    # An HF apple/coreml-* repository: split_einsum/packages with a 6-bit palettized, bisected UNet (the full
    # UNet removed, as --remove-original does); compiled/ folders that Linux cannot load; original/ compiled only.
    hf = root / "hf"
    packages = hf / "split_einsum" / "packages"
    packages.mkdir(parents=True)
    for mlsd_name, role in APPLE_PARTS.items():
        shutil.copytree(bundle / f"{mlsd_name}.mlpackage", packages / f"{PREFIX}_{role}.mlpackage")
    q6 = _palettize(unet, packages / f"{PREFIX}_unet.mlpackage")
    _bisect(q6, packages)
    compiled = hf / "split_einsum" / "compiled"
    for name, role in [*APPLE_PARTS.items(), ("UnetChunk1", "unet_chunk1"), ("UnetChunk2", "unet_chunk2")]:
        _fake_compiled(packages / f"{PREFIX}_{role}.mlpackage", compiled / f"{name}.mlmodelc")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir() / name, compiled / name)
    for name, src in (("TextEncoder", packages / f"{PREFIX}_text_encoder.mlpackage"), ("Unet", q6),
                      ("VAEDecoder", packages / f"{PREFIX}_vae_decoder.mlpackage")):
        _fake_compiled(src, hf / "original" / "compiled" / f"{name}.mlmodelc")
    f["hf"] = hf
    bundle_q6 = root / "bundle_q6"  # mlsd's own bundle with the same palettized UNet
    shutil.copytree(bundle, bundle_q6)
    shutil.rmtree(bundle_q6 / "Unet.mlpackage")
    shutil.copytree(q6, bundle_q6 / "Unet.mlpackage")
    shutil.rmtree(q6)
    f["bundle_q6"] = bundle_q6

    # MochiDiffusion / Swift Resources: chunks, .mlpackage stand-ins beside compiled siblings, tokenizer files,
    # and a compiled-only safety checker.
    mochi = root / "mochi"
    mochi.mkdir()
    for name in APPLE_PARTS:
        shutil.copytree(bundle / f"{name}.mlpackage", mochi / f"{name}.mlpackage")
    for i in (1, 2):
        shutil.copytree(apple / f"{PREFIX}_unet_chunk{i}.mlpackage", mochi / f"UnetChunk{i}.mlpackage")
    for name in ("TextEncoder", "VAEDecoder"):
        _fake_compiled(mochi / f"{name}.mlpackage", mochi / f"{name}.mlmodelc")
    _fake_compiled(apple / f"{PREFIX}_safety_checker.mlpackage", mochi / "SafetyChecker.mlmodelc")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir() / name, mochi / name)
    f["mochi"] = mochi

    # A Resources folder with only compiled models (what Apple's Swift CLI and Mochi download).
    compiled_only = root / "compiled_only"
    for name in ("TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder"):
        _fake_compiled(mochi / f"{name}.mlpackage", compiled_only / f"{name}.mlmodelc")
    f["compiled_only"] = compiled_only

    # A ControlNet-ready UNet (Swift name ControlledUnet) without a ControlNet.
    controlled = root / "controlled"
    controlled.mkdir()
    for name in APPLE_PARTS:
        shutil.copytree(bundle / f"{name}.mlpackage", controlled / f"{name}.mlpackage")
    _controlled_unet(bundle / "Unet.mlpackage", controlled / "ControlledUnet.mlpackage")
    f["controlled"] = controlled

    f["sd2_inpaint_original"] = _stand_ins(root / "sd2", width=1024, channels=9, latent=96, original=True)
    f["sd1_split"] = _stand_ins(root / "sd1", width=768, channels=4, latent=64, original=False)
    return f


@pytest.fixture(scope="module")
def reference_images(foreign):
    """mlsd's own bundles' images: seed 11 (the gate) and seed 12 (the negative control)."""
    out = {}
    for name in ("bundle", "bundle_q6"):
        backend = CoreMLBackend(foreign[name])
        out[name] = (run(backend, _request()).images[0], run(backend, _request(seed=12)).images[0])
    return out


# ----------------------------------------------------------------------------- recognition
RECOGNISED = [  # folder, layout, family, size, attention, inpainting, chunks, palettized
    ("apple", APPLE, "sd1", "64x64", "split_einsum", False, 2, False),
    ("hf", HF_REPO, "sd1", "64x64", "split_einsum", False, 2, True),
    ("mochi", RESOURCES, "sd1", "64x64", "split_einsum", False, 2, False),
    ("controlled", RESOURCES, "sd1", "64x64", "split_einsum", False, 1, False),
    ("sd2_inpaint_original", APPLE, "sd2", "768x768", "original", True, 1, False),
    ("sd1_split", APPLE, "sd1", "512x512", "split_einsum", False, 1, False),
]


@pytest.mark.parametrize("case", RECOGNISED, ids=[c[0] for c in RECOGNISED])
def test_each_layout_is_recognised_with_its_manifest(foreign, case):
    name, kind, family, size, attention, inpainting, chunks, palettized = case
    layout = read_layout(foreign[name])
    m = layout.manifest
    assert recognise(foreign[name]) == kind and layout.kind == kind
    assert (m["family"], m["options"]["sizes"], m["options"]["attention"], m["inpainting"]) == (
        family, [size], attention, inpainting)
    assert len(layout.unet) == chunks and m["components"]["unet"]["palettized"] is palettized
    assert m["target"] == "macOS13/iOS16"
    summary = describe_folder(foreign[name])
    assert summary["compute_unit"] == ("gpu" if attention == "original" else "ane")
    assert all(p.suffix == ".mlpackage" for p in layout.packages)


def test_what_cannot_be_read_is_said_and_can_be_set(foreign):
    tiny = read_layout(foreign["apple"])
    assert any("text width 64" in n for n in tiny.notes)  # the tiny model's width names no family
    assert read_layout(foreign["apple"], family="sd2").manifest["family"] == "sd2"
    assert any("prediction type epsilon assumed for SD1" in n for n in tiny.notes)
    sd2 = read_layout(foreign["sd2_inpaint_original"])
    assert sd2.manifest["prediction_type"] == "v_prediction" and "assumed" in sd2.manifest["prediction_source"]
    assert not any("text width" in n for n in sd2.notes)  # 1024 is SD2's width: nothing to warn about
    given = read_layout(foreign["sd2_inpaint_original"], prediction_type="epsilon").manifest
    assert (given["prediction_type"], given["prediction_source"]) == ("epsilon", "--prediction-type")
    assert read_layout(foreign["sd1_split"]).manifest["prediction_type"] == "epsilon"


def test_hf_repo_runs_the_packages_and_borrows_the_compiled_tokenizer(foreign):
    layout = read_layout(foreign["hf"])
    assert all("split_einsum/packages" in str(p) for p in layout.packages)
    assert layout.tokenizer == foreign["hf"] / "split_einsum" / "compiled"
    assert set(layout.variants) == {"split_einsum/packages", "split_einsum/compiled", "original/compiled"}
    # compiled/ given directly on Linux: its packages/ sibling runs instead, and it says so
    direct = read_layout(foreign["hf"] / "split_einsum" / "compiled", compiled_ok=False)
    assert all("split_einsum/packages" in str(p) for p in direct.packages)
    assert any("macOS" in n for n in direct.notes)
    with pytest.raises(UsageError, match="only on macOS.*original/compiled"):
        read_layout(foreign["hf"], attention="original", compiled_ok=False)


def test_mochi_folder_prefers_packages_over_compiled_siblings_and_ignores_the_safety_checker(foreign):
    layout = read_layout(foreign["mochi"], compiled_ok=False)
    assert [p.name for p in layout.unet] == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    assert layout.text_encoder.name == "TextEncoder.mlpackage" and layout.tokenizer == foreign["mochi"]
    assert set(layout.ignored) == {"safety_checker"} and layout.ignored["safety_checker"].suffix == ".mlmodelc"
    apple = read_layout(foreign["apple"])
    assert apple.ignored["safety_checker"].name == f"{PREFIX}_safety_checker.mlpackage"
    assert apple.ignored["safety_checker"] not in apple.packages  # listed, never run
    # both the full UNet and its chunks: the chunks run, as Apple's Swift pipeline picks them
    assert [p.name for p in apple.unet] == [f"{PREFIX}_unet_chunk1.mlpackage", f"{PREFIX}_unet_chunk2.mlpackage"]
    assert "safety_checker" in describe_folder(foreign["apple"])["ignored"]


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name,reference", [("apple", "bundle"), ("mochi", "bundle"), ("controlled", "bundle"),
                                            ("hf", "bundle_q6")])
def test_folder_generates_the_image_of_mlsds_own_bundle(foreign, reference_images, name, reference):
    ours = run(CoreMLBackend(foreign[name]), _request()).images[0]
    same, other_seed = reference_images[reference]
    score = psnr(ours, same)
    print(f"{name} vs mlsd bundle: {score:.1f} dB; vs another seed: {psnr(ours, other_seed):.1f} dB")
    assert score >= GATE
    assert psnr(ours, other_seed) < GATE - 10  # the gate tells images apart


def test_palettized_weights_really_differ(reference_images):
    full, _ = reference_images["bundle"]
    q6, _ = reference_images["bundle_q6"]
    assert psnr(full, q6) < 60  # 6-bit weights move the image: the hf case does run the LUT UNet


def test_controlnet_residual_inputs_are_wired_and_fed_zeros(foreign):
    layout = read_layout(foreign["controlled"])
    assert layout.manifest["components"]["unet"]["residual_inputs"] == ["additional_residual_0"]
    assert describe_folder(foreign["controlled"])["controlnet_ready"]
    unet = Executor(layout.unet[0])
    g = np.random.default_rng(0)
    feed = {n: g.standard_normal(s.shape).astype(np.float16 if s.dtype == "fp16" else np.float32)
            for n, s in unet.inputs.items()}
    zeros = unet.run(feed | {"additional_residual_0": np.zeros_like(feed["additional_residual_0"])})["noise_pred"]
    ones = unet.run(feed | {"additional_residual_0": np.ones_like(feed["additional_residual_0"])})["noise_pred"]
    plain = Executor(foreign["bundle"] / "Unet.mlpackage").run(
        {k: v for k, v in feed.items() if k != "additional_residual_0"})["noise_pred"]
    assert np.array_equal(zeros, plain)
    assert np.abs(ones - plain).max() > 1e-2


def test_cli_generates_from_a_foreign_folder(foreign, reference_images, tmp_path, capsys):
    out = tmp_path / "mochi.png"
    rc = main(["generate", "--backend", "coreml-reference", "--model", str(foreign["mochi"]), "-p", "a red circle",
               "-n", "blue", "--steps", "3", "--seed", "11", "--width", "64", "--height", "64", "--sampler",
               "Euler a", "-o", str(out), "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert rc == 0, err
    from PIL import Image

    assert psnr(Image.open(out).convert("RGB"), reference_images["bundle"][0]) >= GATE


# ----------------------------------------------------------------------------- backend choice and errors
def test_backend_choice_for_foreign_folders(foreign):
    kind, path, why = choose_backend(ModelKey(foreign["apple"]))
    assert path == foreign["apple"]
    assert kind == ("coreml" if sys.platform == "darwin" else "coreml-reference")
    assert sys.platform == "darwin" or "reference executor" in why
    with pytest.raises(UsageError, match="--backend torch needs a checkpoint"):
        choose_backend(ModelKey(foreign["apple"], backend="torch"))
    with pytest.raises(UsageError, match="LoRAs cannot be added"):
        choose_backend(ModelKey(foreign["apple"], loras=(LoraChoice(foreign["apple"] / "x.safetensors"),)))


def _copy_without(src: Path, dst: Path, *drop: str) -> Path:
    shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if n in drop] if Path(folder) == src
                    else [], copy_function=os.link)
    return dst


def test_incomplete_folders_name_the_missing_part_and_the_layout(foreign, tmp_path):
    apple = _copy_without(foreign["apple"], tmp_path / "apple", f"{PREFIX}_unet.mlpackage",
                          f"{PREFIX}_unet_chunk2.mlpackage")
    with pytest.raises(InputFileError, match=rf"apple-packages folder is incomplete: {PREFIX}_unet_chunk2"):
        CoreMLBackend(apple)
    mochi = _copy_without(foreign["mochi"], tmp_path / "mochi", "VAEDecoder.mlpackage", "VAEDecoder.mlmodelc")
    with pytest.raises(InputFileError, match=r"mochi-resources folder is incomplete: VAEDecoder.mlmodelc"):
        CoreMLBackend(mochi)
    # a chunk gone but the full UNet still there: the full UNet runs, and that is said
    partial = _copy_without(foreign["apple"], tmp_path / "partial", f"{PREFIX}_unet_chunk2.mlpackage")
    layout = read_layout(partial)
    assert [p.name for p in layout.unet] == [f"{PREFIX}_unet.mlpackage"]
    assert any("incomplete unet chunks" in n for n in layout.notes)
    rc = main(["models", "--models-dir", str(tmp_path / "none")])
    assert rc == 0
    with pytest.raises(InputFileError, match="No Core ML model here"):
        CoreMLBackend(tmp_path / "none")


def test_compiled_only_folder_says_macos_plainly(foreign, tmp_path, capsys):
    if sys.platform == "darwin":
        pytest.skip("Core ML loads .mlmodelc on macOS")
    with pytest.raises(UsageError, match=r"load only through Core ML, which exists only on macOS"):
        CoreMLBackend(foreign["compiled_only"])
    rc = main(["generate", "--backend", "coreml-reference", "--model", str(foreign["compiled_only"]), "-p", "x",
               "--width", "64", "--height", "64", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "macOS" in err and "Traceback" not in err and not (tmp_path / "x.png").exists()
    described = describe_folder(foreign["compiled_only"])  # listing still reads the compiled metadata
    assert described["runs_here"] is False and described["chunks"] == 2 and described["size"] == "64x64"


def test_models_listing_shows_layout_family_size_attention_and_advice(foreign, tmp_path, capsys):
    coreml = tmp_path / "models" / "Core-ML"
    coreml.mkdir(parents=True)
    for name in ("apple", "hf", "mochi", "compiled_only", "sd2_inpaint_original", "bundle"):
        (coreml / name).symlink_to(foreign[name], target_is_directory=True)
    assert main(["models", "--json", "--models-dir", str(tmp_path / "models")]) == 0
    listing = {e["name"]: e for e in json.loads(capsys.readouterr().out)["coreml"]}
    assert listing["apple"]["layout"] == APPLE and listing["apple"]["compute_unit"] == "ane"
    assert listing["hf"]["layout"] == HF_REPO and listing["hf"]["palettized"]
    assert (listing["sd2_inpaint_original"]["family"], listing["sd2_inpaint_original"]["size"],
            listing["sd2_inpaint_original"]["attention"], listing["sd2_inpaint_original"]["compute_unit"]) == (
        "sd2", "768x768", "original", "gpu")
    assert listing["bundle"]["layout"] == "mlsd bundle" and listing["bundle"]["target"] == "iOS16"
    assert main(["models", "--models-dir", str(tmp_path / "models")]) == 0
    text = capsys.readouterr().out
    assert "apple-packages sd1 64x64 split_einsum compute unit ane 2 UNet chunks ignored: safety_checker" in text
    assert "sd2 inpainting 768x768 original compute unit gpu" in text
    if sys.platform != "darwin":
        assert "(compiled: macOS only)" in text


# ----------------------------------------------------------------------------- executor coverage
def test_executor_covers_the_op_set_of_apple_style_packages(foreign):
    found = set()
    for name in ("apple", "hf", "controlled", "sd2_inpaint_original", "sd1_split"):
        for package in Path(foreign[name]).rglob("*.mlpackage"):
            info = read_package(package)
            assert info.target == "macOS13/iOS16"  # opset CoreML6
            found |= set(load_program(package).op_types())
    print(f"\nop types in the Apple-style packages ({len(found)}): {', '.join(sorted(found))}")
    assert {"einsum", "split", "softmax", "cast", "constexpr_lut_to_dense", "conv", "matmul", "gather"} <= found
    assert found - {"const"} <= set(supported_op_types()), sorted(found - set(supported_op_types()))
    chunk2 = read_package(foreign["apple"] / f"{PREFIX}_unet_chunk2.mlpackage")
    crossing = [n for n in chunk2.inputs if n != "encoder_hidden_states"]
    assert crossing and all(chunk2.inputs[n][1] == "fp32" for n in crossing)  # fp32 at the chunk boundary


def test_apple_split_einsum_attention_pattern_matches_numpy():
    """Apple's per-head kernel: q (B,C,1,S) and k transposed to (B,S,1,C) split per head, scores
    einsum('bchq,bkhc->bkhq'), softmax over the keys (axis 1), einsum('bkhq,bchk->bchq') with v, concat;
    fp16 inside, fp32 at the boundaries as a chunked package has. MIL's einsum takes one operand order
    ('nchw,nwhu->nchu'), which is how the converter writes Apple's two products."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from mlsd.coreml.testing import run_op

    heads, d, s = 2, 4, 5
    g = np.random.default_rng(1)
    q, k, v = (g.standard_normal((1, heads * d, 1, s)).astype(np.float32) for _ in range(3))

    def build(q, k, v):
        q16, v16 = mb.cast(x=q, dtype="fp16"), mb.cast(x=v, dtype="fp16")
        kt = mb.transpose(x=mb.cast(x=k, dtype="fp16"), perm=[0, 3, 2, 1])
        qs, ks, vs = (mb.split(x=q16, num_splits=heads, axis=1), mb.split(x=kt, num_splits=heads, axis=3),
                      mb.split(x=v16, num_splits=heads, axis=1))
        outs = []
        for qh, kh, vh in zip(qs, ks, vs, strict=True):
            scores = mb.einsum(values=(kh, qh), equation="bkhc,bchq->bkhq")
            w = mb.softmax(x=mb.mul(x=scores, y=np.float16(d**-0.5)), axis=1)
            outs.append(mb.einsum(values=(vh, w), equation="bchk,bkhq->bchq"))
        return mb.cast(x=mb.concat(values=outs, axis=1), dtype="fp32")

    (got,) = run_op(build, {"q": q, "k": k, "v": v}, ct.target.iOS16)
    ref = []
    for h in range(heads):
        qh, kh, vh = (x[0, h * d:(h + 1) * d, 0] for x in (q, k, v))  # (d, S)
        scores = kh.T @ qh * d**-0.5  # (keys, queries)
        w = np.exp(scores - scores.max(0)) / np.exp(scores - scores.max(0)).sum(0)
        ref.append(vh @ w)
    ref = np.concatenate(ref)[None, :, None, :]
    assert np.abs(got - ref).max() < 5e-3
    assert np.abs(got - np.roll(ref, 1, axis=3)).max() > 5e-2  # the comparison can fail


# ----------------------------------------------------------------------------- mlsd verify
def test_verify_proves_a_foreign_folder_against_its_checkpoint(foreign, tiny_checkpoints, capsys):
    source, _ = tiny_checkpoints("sd1")
    rc = main(["verify", str(foreign["apple"]), "--against", str(source), "--json"])
    checks = json.loads(capsys.readouterr().out)
    assert rc == 0 and {c["component"] for c in checks} == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(c["passed"] and c["psnr"] >= 35 for c in checks)
    assert not (foreign["apple"] / "mlsd.json").exists()  # nothing written into someone else's folder
    # negative control: another model of the same architecture fails the same gate
    other, _ = tiny_checkpoints("sd1", seed=7)
    rc = main(["verify", str(foreign["apple"] / f"{PREFIX}_text_encoder.mlpackage"), "--against", str(other),
               "--json"])
    checks = json.loads(capsys.readouterr().out)
    assert rc == 1 and [c["component"] for c in checks] == ["text_encoder", "text_encoder"]
    assert not any(c["passed"] for c in checks)


def test_verify_needs_against_for_a_foreign_folder(foreign, capsys):
    rc = main(["verify", str(foreign["mochi"])])
    err = capsys.readouterr().err
    assert rc != 0 and "--against" in err and "record no source checkpoint" in err
