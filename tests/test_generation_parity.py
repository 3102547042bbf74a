"""mlsd's one loop on the PyTorch backend reproduces diffusers' pipelines on the same weights.

Every gate has a negative control: a different seed (or prompt) must fall far below it,
so a near-constant image from a tiny random model cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlsd.backends.torch_backend import TorchBackend
from mlsd.checkpoints.load import load_model
from mlsd.pipeline.generate import run
from mlsd.pipeline.request import GenerationRequest
from mlsd.pipeline.samplers import sampler_names
from tests.generation_helpers import GATE_DB, psnr, reference

SIZE = 64
STEPS = 4


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints):
    path, _ = tiny_checkpoints("sd1")
    model = load_model(path)
    return model, TorchBackend(model, "cpu")


def _request(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", negative_prompt="green", steps=STEPS, cfg_scale=7.0,
                seed=1234, width=SIZE, height=SIZE, mask_blur=0)
    return GenerationRequest(**(base | kw))


def _init_image(seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    arr = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) % 256
    return Image.fromarray((arr + rng.integers(0, 30, arr.shape)).clip(0, 255).astype(np.uint8))


def _mask() -> Image.Image:
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[16:48, 8:40] = 255
    return Image.fromarray(arr, "L")


def _overlay(image: Image.Image, init: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 pastes the original back outside the mask; diffusers offers the same step as apply_overlay."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().apply_overlay(mask, init, image)


def test_inpaint_keeps_pixels_outside_the_mask(sd1):
    _, backend = sd1
    init, mask = _init_image(), _mask()
    out = np.asarray(run(backend, _request(sampler="Euler", init_image=init, mask=mask)).images[0])
    keep = np.asarray(mask) == 0
    assert (out[keep] == np.asarray(init)[keep]).all()
    assert not (out[~keep] == np.asarray(init)[~keep]).all()
    raw = np.asarray(run(backend, _request(sampler="Euler", init_image=init, mask=mask, overlay=False)).images[0])
    assert not (raw[keep] == np.asarray(init)[keep]).all()  # without the overlay the VAE changes them


@pytest.mark.parametrize("sampler", sampler_names())
def test_txt2img_matches_diffusers_for_every_sampler(sd1, sampler):
    model, backend = sd1
    ours = run(backend, _request(sampler=sampler)).images[0]
    ref = reference("txt2img", model, sampler, 1234, prompt="a red circle on a blue background",
                    negative_prompt="green", num_inference_steps=STEPS, guidance_scale=7.0,
                    width=SIZE, height=SIZE)[0]
    assert psnr(ours, ref) >= GATE_DB
    other_seed = run(backend, _request(sampler=sampler, seed=1235)).images[0]
    assert psnr(other_seed, ref) < GATE_DB - 15


def test_batch_uses_seed_plus_index_like_diffusers(sd1):
    model, backend = sd1
    result = run(backend, _request(sampler="Euler a", batch_size=2))
    assert result.seeds == [1234, 1235]
    refs = reference("txt2img", model, "Euler a", 1234, prompt="a red circle on a blue background",
                     negative_prompt="green", num_inference_steps=STEPS, guidance_scale=7.0, width=SIZE,
                     height=SIZE, num_images_per_prompt=2)
    for ours, ref in zip(result.images, refs, strict=True):
        assert psnr(ours, ref) >= GATE_DB
    assert psnr(result.images[0], result.images[1]) < GATE_DB - 15


def test_batch_count_continues_seeds(sd1):
    _, backend = sd1
    two_batches = run(backend, _request(sampler="Euler", batch_count=2))
    assert two_batches.seeds == [1234, 1235]
    single = run(backend, _request(sampler="Euler", seed=1235)).images[0]
    assert psnr(two_batches.images[1], single) == 100.0


def test_clip_skip_2_equals_a_text_encoder_one_layer_shorter(sd1):
    """Independent reference: a CLIP model truncated by one layer, fed to diffusers as prompt embeddings.

    (diffusers' own clip_skip path assumes transformers 4's module layout.)
    """
    import copy

    import torch

    model, backend = sd1
    short = copy.deepcopy(model.text_encoder)
    layers = short.encoder.layers if hasattr(short, "encoder") else short.text_model.encoder.layers
    del layers[-1]
    embeds = []
    for text in ("a red circle on a blue background", "green"):
        ids = model.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            embeds.append(short(ids).last_hidden_state)
    ours = run(backend, _request(sampler="Euler", clip_skip=2)).images[0]
    ref = reference("txt2img", model, "Euler", 1234, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                    num_inference_steps=STEPS, guidance_scale=7.0, width=SIZE, height=SIZE)[0]
    assert psnr(ours, ref) >= GATE_DB
    assert psnr(run(backend, _request(sampler="Euler")).images[0], ref) < GATE_DB


def test_cfg_one_skips_guidance_like_diffusers(sd1):
    model, backend = sd1
    ours = run(backend, _request(sampler="DDIM", cfg_scale=1.0)).images[0]
    ref = reference("txt2img", model, "DDIM", 1234, prompt="a red circle on a blue background",
                    negative_prompt="green", num_inference_steps=STEPS, guidance_scale=1.0, width=SIZE,
                    height=SIZE)[0]
    assert psnr(ours, ref) >= GATE_DB


@pytest.mark.parametrize("sampler", sampler_names())
def test_img2img_matches_diffusers(sd1, sampler):
    model, backend = sd1
    init = _init_image()
    ours = run(backend, _request(sampler=sampler, init_image=init, strength=0.6, steps=5)).images[0]
    ref = reference("img2img", model, sampler, 1234, prompt="a red circle on a blue background",
                    negative_prompt="green", image=init, strength=0.6, num_inference_steps=5,
                    guidance_scale=7.0)[0]
    assert psnr(ours, ref) >= GATE_DB
    other = run(backend, _request(sampler=sampler, init_image=init, strength=0.6, steps=5, seed=99)).images[0]
    assert psnr(other, ref) < psnr(ours, ref) - 15


@pytest.mark.parametrize("strength,sampler", [(1.0, "Euler a"), (0.7, "Euler a")]
                         + [(0.8, s) for s in sampler_names() if s != "Euler a"])
def test_inpaint_with_ordinary_checkpoint_matches_diffusers(sd1, strength, sampler):
    model, backend = sd1
    init, mask = _init_image(), _mask()
    ours = run(backend, _request(sampler=sampler, init_image=init, mask=mask, strength=strength)).images[0]
    ref = reference("inpaint", model, sampler, 1234, prompt="a red circle on a blue background",
                    negative_prompt="green", image=init, mask_image=mask, strength=strength,
                    num_inference_steps=STEPS, guidance_scale=7.0, width=SIZE, height=SIZE)[0]
    ref = _overlay(ref, init, mask)
    assert psnr(ours, ref) >= GATE_DB
    other = run(backend, _request(sampler=sampler, init_image=init, mask=mask, strength=strength,
                                  seed=7)).images[0]
    assert psnr(other, ref) < psnr(ours, ref) - 15


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_with_inpainting_checkpoint_matches_diffusers(tiny_checkpoints, strength):
    path, _ = tiny_checkpoints("sd1", inpainting=True)
    model = load_model(path)
    backend = TorchBackend(model, "cpu")
    init, mask = _init_image(), _mask()
    ours = run(backend, _request(sampler="DPM++ 2M", init_image=init, mask=mask, strength=strength)).images[0]
    ref = reference("inpaint", model, "DPM++ 2M", 1234, prompt="a red circle on a blue background",
                    negative_prompt="green", image=init, mask_image=mask, strength=strength,
                    num_inference_steps=STEPS, guidance_scale=7.0, width=SIZE, height=SIZE)[0]
    ref = _overlay(ref, init, mask)
    assert psnr(ours, ref) >= GATE_DB
    other = run(backend, _request(sampler="DPM++ 2M", init_image=init, mask=mask, strength=strength,
                                  seed=5)).images[0]
    assert psnr(other, ref) < psnr(ours, ref) - 15


def test_sd2_v_prediction_matches_diffusers(tiny_checkpoints):
    path, _ = tiny_checkpoints("sd2")
    model = load_model(path)
    assert model.prediction_type == "v_prediction"
    backend = TorchBackend(model, "cpu")
    ours = run(backend, _request(sampler="Euler a")).images[0]
    ref = reference("txt2img", model, "Euler a", 1234, prompt="a red circle on a blue background",
                    negative_prompt="green", num_inference_steps=STEPS, guidance_scale=7.0,
                    width=SIZE, height=SIZE)[0]
    assert psnr(ours, ref) >= GATE_DB
    assert psnr(run(backend, _request(sampler="Euler a", seed=3)).images[0], ref) < GATE_DB - 15


def test_single_file_and_diffusers_folder_give_the_same_image(sd1, tmp_path):
    model, backend = sd1
    folder = tmp_path / "folder"
    for name in ("unet", "vae", "text_encoder"):
        getattr(model, name).save_pretrained(folder / name)
    (folder / "model_index.json").write_text("{}")
    from_folder = TorchBackend(load_model(folder, prediction_type="epsilon"), "cpu")
    a = run(backend, _request(sampler="UniPC")).images[0]
    b = run(from_folder, _request(sampler="UniPC")).images[0]
    assert psnr(a, b) == 100.0
    assert psnr(a, run(from_folder, _request(sampler="UniPC", prompt="a cat")).images[0]) < GATE_DB
