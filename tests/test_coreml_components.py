"""Text encoder and VAE halves convert to Core ML with Apple's I/O contract; the wrappers equal their sources.

Linux coremltools cannot run a model, so the saved packages are checked by their spec (names, shapes,
dtypes, op kinds); numerical checks of the packages belong to the MIL reference executor.
"""

from __future__ import annotations

import copy
import time

import coremltools as ct
import numpy as np
import pytest
import torch

from converters.coreml.components import (
    TextEncoderWrapper,
    VAEDecoderWrapper,
    VAEEncoderWrapper,
    convert_text_encoder,
    convert_vae_decoder,
    convert_vae_encoder,
    describe_io,
)
from converters.coreml.export import model_spec, op_types, save_package, to_mlprogram

LATENT = (8, 8)
IMAGE = (64, 64)
# Converting costs seconds per component, so each family converts its text encoder once, with a clip
# skip that differs between them; the VAE is the same architecture in both families.
CLIP_SKIP = {"sd1": 2, "sd2": 1}
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    from mlsd.checkpoints.load import load_model

    return {family: load_model(tiny_checkpoints(family)[0]) for family in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def packages(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    jobs = {
        "sd1_text": lambda: convert_text_encoder(models["sd1"].text_encoder, clip_skip=CLIP_SKIP["sd1"]),
        "sd2_text": lambda: convert_text_encoder(models["sd2"].text_encoder, clip_skip=CLIP_SKIP["sd2"]),
        "vae_decoder": lambda: convert_vae_decoder(models["sd1"].vae, LATENT),
        "vae_encoder": lambda: convert_vae_encoder(models["sd1"].vae, IMAGE),
    }
    out = {}
    for name, job in jobs.items():
        start = time.perf_counter()
        mlmodel = job()
        TIMES[name] = time.perf_counter() - start
        out[name] = save_package(mlmodel, root / f"{name}.mlpackage")
        del mlmodel
    return out


def _reload(path):
    # On Linux the package can only be opened as a spec: Core ML itself is not there to compile it.
    return ct.models.MLModel(str(path), skip_model_load=True)


def _ids(model, prompt: str) -> torch.Tensor:
    return model.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids


# --- saved packages: Apple's I/O contract ------------------------------------------------------------

@pytest.mark.parametrize("family, width", [("sd1", 64), ("sd2", 128)])
def test_text_encoder_package_io(packages, family, width):
    mlmodel = _reload(packages[f"{family}_text"])
    assert describe_io(mlmodel) == {
        "inputs": {"input_ids": {"shape": [1, 77], "dtype": "float32"}},
        "outputs": {"last_hidden_state": {"shape": [1, 77, width], "dtype": "float32"},
                    "pooled_outputs": {"shape": [1, width], "dtype": "float32"}},
    }
    spec = mlmodel.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion == 8  # macOS14
    ops = op_types(mlmodel)
    assert {"gather", "layer_norm", "linear", "matmul", "softmax", "reduce_argmax", "cast"} <= set(ops)
    # One attention softmax per layer kept: clip skip is baked in, skipped layers never reach the file.
    assert ops["softmax"] == 2 - CLIP_SKIP[family] + 1
    assert ops["layer_norm"] == 2 * ops["softmax"] + 1


def test_text_ids_reach_int32_without_fp16(packages):
    """Ids above 2048 do not survive fp16: input_ids must be cast straight to int32."""
    spec = model_spec(packages["sd1_text"])
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    users = [op for op in block.operations
             if any(b.name == "input_ids" for arg in op.inputs.values() for b in arg.arguments)]
    assert users and all(op.type == "cast" for op in users)
    int32 = ct.proto.MIL_pb2.DataType.Value("INT32")
    assert all(op.outputs[0].type.tensorType.dataType == int32 for op in users)


def test_vae_decoder_package_io(packages):
    mlmodel = _reload(packages["vae_decoder"])
    h, w = LATENT
    assert describe_io(mlmodel) == {
        "inputs": {"z": {"shape": [1, 4, h, w], "dtype": "float32"}},
        "outputs": {"image": {"shape": [1, 3, 8 * h, 8 * w], "dtype": "float32"}},
    }
    ops = op_types(mlmodel)
    assert {"conv", "upsample_nearest_neighbor", "silu", "softmax", "cast"} <= set(ops)
    assert ops["softmax"] == 1  # the mid-block attention


def test_vae_encoder_package_io(packages):
    mlmodel = _reload(packages["vae_encoder"])
    assert describe_io(mlmodel) == {
        "inputs": {"x": {"shape": [1, 3, *IMAGE], "dtype": "float32"}},
        "outputs": {"latent": {"shape": [1, 8, IMAGE[0] // 8, IMAGE[1] // 8], "dtype": "float32"}},
    }
    ops = op_types(mlmodel)
    assert {"conv", "pad", "silu", "softmax"} <= set(ops)
    assert "upsample_nearest_neighbor" not in ops


def test_conversion_times(packages, capsys):
    with capsys.disabled():
        print("\nconversion seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))
    assert set(TIMES) == set(packages)


# --- wrappers equal their sources (torch side) --------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_wrapper_matches_clip(models, family):
    model = models[family]
    te = model.text_encoder
    ids = _ids(model, "a photo of an astronaut riding a horse")
    wrapper = TextEncoderWrapper(te).eval()
    with torch.no_grad():
        ref = te(ids)
        hidden, pooled = wrapper(ids.float())
        other, other_pooled = wrapper(_ids(model, "a bowl of soup").float())
    torch.testing.assert_close(hidden, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, hidden, atol=1e-3)
    assert not torch.allclose(other_pooled, pooled, atol=1e-3)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_clip_skip_2_is_one_layer_less(models, family):
    model = models[family]
    te = model.text_encoder
    cut = copy.deepcopy(te)
    del cut.encoder.layers[-1]
    cut.config.num_hidden_layers -= 1
    ids = _ids(model, "a castle on a hill, oil painting")
    with torch.no_grad():
        ref = cut(ids)
        # A1111's definition: the penultimate hidden state, through the final layer norm.
        a1111 = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        hidden, pooled = TextEncoderWrapper(te, clip_skip=2).eval()(ids.float())
        last, _ = TextEncoderWrapper(te, clip_skip=1).eval()(ids.float())
    torch.testing.assert_close(hidden, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, a1111, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden, last, atol=1e-3)


def test_clip_skip_out_of_range(models):
    te = models["sd1"].text_encoder
    for bad in (0, len(te.encoder.layers) + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            TextEncoderWrapper(te, clip_skip=bad)


def test_vae_decoder_wrapper_matches_decode(models):
    vae = models["sd1"].vae
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, *LATENT, generator=gen)
    with torch.no_grad():
        image = VAEDecoderWrapper(vae).eval()(z)
        other = VAEDecoderWrapper(vae).eval()(z + 0.5)
        torch.testing.assert_close(image, vae.decode(z).sample, rtol=1e-5, atol=1e-5)
    assert image.shape == (1, 3, 8 * LATENT[0], 8 * LATENT[1])
    assert not torch.allclose(image, other, atol=1e-3)


def test_vae_encoder_wrapper_matches_encode(models):
    vae = models["sd1"].vae
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, *IMAGE, generator=gen) * 2 - 1
    with torch.no_grad():
        moments = VAEEncoderWrapper(vae).eval()(x)
        other = VAEEncoderWrapper(vae).eval()(x.flip(-1))
        dist = vae.encode(x).latent_dist
    mean, logvar = moments.chunk(2, dim=1)
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
    # diffusers clamps logvar when it builds the distribution; the package leaves that to the caller.
    torch.testing.assert_close(logvar.clamp(-30.0, 20.0), dist.logvar, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moments, other, atol=1e-3)


# --- export helpers -----------------------------------------------------------------------------------

def test_conversion_refuses_half_weights(models):
    vae = copy.deepcopy(models["sd1"].vae).half()
    with pytest.raises(ValueError, match="float32"):
        convert_vae_decoder(vae, LATENT)


def test_to_mlprogram_rejects_unknown_dtype_names():
    with pytest.raises(ValueError, match="output_dtypes"):
        to_mlprogram(torch.nn.Identity(), {"x": torch.zeros(1)}, output_names=["y"],
                     output_dtypes={"nope": np.float32})


def test_save_package_replaces_atomically(packages, tmp_path, monkeypatch):
    mlmodel = _reload(packages["vae_encoder"])
    target = tmp_path / "Model.mlpackage"
    save_package(mlmodel, target)
    save_package(mlmodel, target)  # over an existing package
    assert describe_io(target) == describe_io(mlmodel)

    def broken_save(path):
        (tmp_path / path).mkdir()
        (tmp_path / path / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(mlmodel, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_package(mlmodel, target)
    # The old package is still whole, and no temporary sibling is left behind.
    assert describe_io(target) == describe_io(packages["vae_encoder"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Model.mlpackage"]
