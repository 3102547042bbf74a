"""Several resolutions and prompt lengths in one bundle: multifunction packages whose functions share
weights, every function verified, generation at a non-default size and with a long prompt through the
same backend code."""

from __future__ import annotations

import pytest

from mlsd.backends.coreml_backend import CoreMLBackend
from mlsd.backends.torch_backend import TorchBackend
from mlsd.checkpoints.load import load_model
from mlsd.errors import UsageError
from mlsd.pipeline.generate import run
from mlsd.pipeline.request import GenerationRequest
from tests.generation_helpers import psnr

SIZES = [(64, 64), (128, 64)]  # (width, height)
GATE = 30.0


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles("multisize", chunks=2, sizes=SIZES, prompt_chunks=2, min_target="macOS15")


def _weight_bytes(package):
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def test_every_package_has_one_function_per_size(bundle):
    import json

    from mlsd.coreml import load_program

    manifest = json.loads((bundle / "mlsd.json").read_text())
    unet = ["64x64", "64x64-t154", "128x64", "128x64-t154"]
    assert manifest["components"]["unet"]["functions"] == unet
    for name in ("UnetChunk1", "UnetChunk2"):
        assert set(load_program(bundle / f"{name}.mlpackage").functions) == set(unet), name
    for name in ("VAEDecoder", "VAEEncoder"):
        assert set(load_program(bundle / f"{name}.mlpackage").functions) == {"64x64", "128x64"}, name
    wide = load_program(bundle / "UnetChunk1.mlpackage", "128x64")
    assert wide.inputs["sample"].shape == (2, 4, 8, 16)
    assert wide.inputs["encoder_hidden_states"].shape == (2, 64, 1, 77)
    long = load_program(bundle / "UnetChunk1.mlpackage", "128x64-t154")
    assert long.inputs["encoder_hidden_states"].shape == (2, 64, 1, 154)
    assert load_program(bundle / "VAEDecoder.mlpackage", "128x64").outputs["image"].shape == (1, 3, 64, 128)


def test_sizes_share_their_weights_on_disk(bundle, tiny_bundles):
    single = tiny_bundles("sd1-2chunks", chunks=2)
    for name in ("UnetChunk1.mlpackage", "UnetChunk2.mlpackage"):
        # Four functions, one copy of the weights (each function adds only its program text).
        assert _weight_bytes(bundle / name) < 1.05 * _weight_bytes(single / name), name


def test_every_size_is_verified(bundle):
    from converters.coreml.verify import verify_bundle

    checks = verify_bundle(bundle, write=False)
    labels = {(c.component, c.output) for c in checks}
    assert {("unet", "noise_pred@64x64"), ("unet", "noise_pred@128x64"), ("unet", "noise_pred@128x64-t154"),
            ("vae_decoder", "image@128x64"), ("vae_encoder", "latent@128x64")} <= labels
    assert all(c.passed for c in checks), [(c.output, round(c.psnr, 1)) for c in checks]


def test_generates_at_the_second_size_like_torch(bundle, tiny_checkpoints):
    path, _ = tiny_checkpoints("sd1")
    request = dict(prompt="a red circle", negative_prompt="blue", steps=4, cfg_scale=7.0, width=128, height=64,
                   sampler="Euler a")
    ours = run(CoreMLBackend(bundle, size=(128, 64)), GenerationRequest(seed=11, **request)).images[0]
    assert ours.size == (128, 64)
    ref = run(TorchBackend(load_model(path), "cpu"), GenerationRequest(seed=11, **request)).images[0]
    assert psnr(ours, ref) >= GATE
    other = run(CoreMLBackend(bundle, size=(128, 64)), GenerationRequest(seed=12, **request)).images[0]
    assert psnr(other, ref) < GATE - 10  # negative control: another seed


def test_a_size_the_bundle_lacks_is_explained(bundle):
    with pytest.raises(UsageError, match="64x64, 128x64"):
        CoreMLBackend(bundle, size=(64, 128))


def test_long_prompt_runs_through_its_own_function_like_torch(bundle, tiny_checkpoints):
    path, _ = tiny_checkpoints("sd1")
    prompt = ", ".join(["a very detailed red circle on a blue background"] * 9)  # ~90 tokens: two chunks
    request = dict(prompt=prompt, negative_prompt="green", steps=4, cfg_scale=7.0, width=64, height=64,
                   sampler="Euler a")
    backend = CoreMLBackend(bundle)
    ours = run(backend, GenerationRequest(seed=11, **request)).images[0]
    assert set(backend._unet_by_tokens) == {77, 154}
    ref = run(TorchBackend(load_model(path), "cpu"), GenerationRequest(seed=11, **request)).images[0]
    assert psnr(ours, ref) >= GATE
    short = run(backend, GenerationRequest(seed=11, **(request | {"prompt": "a very detailed red circle"})))
    assert psnr(short.images[0], ref) < psnr(ours, ref) - 10  # negative control: the tail of the prompt counts
    with pytest.raises(UsageError, match="up to 2"):
        run(backend, GenerationRequest(seed=11, **(request | {"prompt": ", ".join([prompt] * 2)})))
