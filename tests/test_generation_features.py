"""Generation behaviour beyond plain parity: LoRAs, cancel, progress, long prompts, precision, sizes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mlsd.backends.torch_backend import TorchBackend
from mlsd.checkpoints.load import load_model
from mlsd.errors import UsageError
from mlsd.pipeline.generate import encode_prompt_pair, generate, run
from mlsd.pipeline.images import outpaint_canvas, resize_image
from mlsd.pipeline.loop import Cancelled
from mlsd.pipeline.request import GenerationRequest, GenerationResult, Progress
from mlsd.pipeline.samplers import sampler_names
from mlsd.session import LoraChoice, ModelKey, load_backend
from tests.generation_helpers import GATE_DB, psnr, reference
from tests.lora_fixtures import hooked, kohya_stem, lora_piece, write_lora

SIZE = 64


def _request(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blue", steps=3, cfg_scale=7.0, seed=77,
                width=SIZE, height=SIZE, sampler="Euler a")
    return GenerationRequest(**(base | kw))


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints):
    path, _ = tiny_checkpoints("sd1")
    return path, TorchBackend(load_model(path), "cpu")


def _te_name(te, name: str) -> str:
    """transformers 5 dropped the 'text_model.' level; trainers still write it."""
    try:
        te.get_submodule(name)
        return name
    except AttributeError:
        return name.removeprefix("text_model.")


@pytest.fixture(scope="module")
def lora_setup(sd1, tmp_path_factory):
    """A kohya LoRA on UNet convs/attention and two text-encoder layers, its merged backend, and the
    unmerged model with the same LoRA as forward hooks (A1111's functional mode): the independent reference."""
    path, plain = sd1
    base = load_model(path)
    g = torch.Generator().manual_seed(3)
    targets = {
        "unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                 "down_blocks.0.attentions.0.proj_in", "up_blocks.1.resnets.0.conv1", "mid_block.resnets.0.conv2"],
        "te": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"],
    }
    entries, unet_hooks, te_hooks = {}, [], []
    for name in targets["unet"]:
        piece = lora_piece(base.unet.get_submodule(name), g, rank=4, alpha=2.0)
        entries[kohya_stem("lora_unet_", name)] = piece
        unet_hooks.append((name, piece.delta, 0.8))
    for name in targets["te"]:
        piece = lora_piece(base.text_encoder.get_submodule(_te_name(base.text_encoder, name)), g, rank=4, alpha=1.0)
        entries[kohya_stem("lora_te_", name)] = piece
        te_hooks.append((_te_name(base.text_encoder, name), piece.delta, 0.5))
    lora = write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", entries)
    merged = load_backend(ModelKey(path, loras=(LoraChoice(lora, unet_weight=0.8, te_weight=0.5),), device="cpu"))
    return path, plain, merged, base, unet_hooks, te_hooks, lora


@pytest.mark.parametrize("sampler", sampler_names())
def test_lora_generation_matches_an_independent_hooked_reference(lora_setup, sampler):
    _, plain, merged, base, unet_hooks, te_hooks, _ = lora_setup
    ours = run(merged, _request(sampler=sampler)).images[0]
    with hooked(base.unet, unet_hooks), hooked(base.text_encoder, te_hooks):
        ref = reference("txt2img", base, sampler, 77, prompt="a red circle", negative_prompt="blue",
                        num_inference_steps=3, guidance_scale=7.0, width=SIZE, height=SIZE)[0]
    assert psnr(ours, ref) >= GATE_DB
    without = run(plain, _request(sampler=sampler)).images[0]
    assert psnr(without, ref) < GATE_DB - 10  # the LoRA visibly changes the image


def test_lora_weight_zero_equals_the_base_model(lora_setup):
    path, plain, _, _, _, _, lora = lora_setup
    zero = load_backend(ModelKey(path, loras=(LoraChoice(lora, 0.0, 0.0),), device="cpu"))
    assert psnr(run(zero, _request()).images[0], run(plain, _request()).images[0]) == 100.0


def test_cancel_stops_within_one_step(sd1):
    _, backend = sd1
    cancel = threading.Event()
    seen = []
    with pytest.raises(Cancelled):
        for event in generate(backend, _request(steps=10), cancel):
            seen.append(event)
            if isinstance(event, Progress) and event.step == 2:
                cancel.set()
    assert [e.step for e in seen] == [1, 2]


@pytest.mark.parametrize("sampler", ["Heun", "DPM2 a", "PLMS", "DPM++ SDE"])
def test_progress_counts_requested_steps_for_multi_evaluation_samplers(sd1, sampler):
    _, backend = sd1
    events = list(generate(backend, _request(sampler=sampler, steps=4)))
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == [1, 2, 3, 4]
    assert all(e.total == 4 for e in events if isinstance(e, Progress))
    assert isinstance(events[-1], GenerationResult)


def test_long_prompts_use_more_chunks_and_break_forces_one(sd1):
    _, backend = sd1
    short, _ = encode_prompt_pair(backend, "a cat", "")
    long_prompt = ", ".join(["a very detailed red circle"] * 20)
    long, uncond = encode_prompt_pair(backend, long_prompt, "")
    broken, _ = encode_prompt_pair(backend, "a cat BREAK a dog", "")
    assert short.shape[1] == 77 and long.shape[1] >= 154 and uncond.shape == long.shape
    assert broken.shape[1] == 154
    image = run(backend, _request(prompt=long_prompt)).images[0]
    assert image.size == (SIZE, SIZE)


def test_emphasis_changes_the_conditioning_and_the_image(sd1):
    _, backend = sd1
    plain, _ = encode_prompt_pair(backend, "a red circle", "")
    stressed, _ = encode_prompt_pair(backend, "a (red:1.5) circle", "")
    assert not torch.allclose(plain, stressed)
    a = run(backend, _request(prompt="a red circle")).images[0]
    b = run(backend, _request(prompt="a (red:1.5) circle")).images[0]
    assert psnr(a, b) < 60


def test_bf16_runs_on_cpu_and_stays_close_to_fp32(tiny_checkpoints):
    path, _ = tiny_checkpoints("sd1")
    fp32 = run(TorchBackend(load_model(path), "cpu"), _request(sampler="Euler")).images[0]
    bf16_backend = TorchBackend(load_model(path), "cpu", "bf16")
    assert next(bf16_backend.model.unet.parameters()).dtype == torch.bfloat16
    bf16 = run(bf16_backend, _request(sampler="Euler")).images[0]
    assert psnr(bf16, fp32) >= 20


def test_fp16_vae_overflow_is_decoded_again_in_fp32(tiny_checkpoints):
    path, _ = tiny_checkpoints("sd1")
    model = load_model(path)
    with torch.no_grad():  # a VAE whose activations overflow fp16 (as real SD VAEs do on some latents)
        model.vae.post_quant_conv.weight.mul_(3e4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference_image = TorchBackend(model, "cpu", "fp32").decode(latents)
    half = TorchBackend(model, "cpu", "fp16")
    with torch.no_grad():
        raw = model.vae.decode((latents / half.traits.scaling_factor).half()).sample
    assert not torch.isfinite(raw).all(), "the test VAE must overflow in fp16"
    fixed = half.decode(latents)
    assert torch.isfinite(fixed).all()
    assert torch.allclose(fixed, reference_image, atol=1e-2)


def test_outpaint_grows_the_canvas_and_masks_only_the_new_area():
    image = Image.fromarray(np.full((16, 24, 3), 200, np.uint8))
    canvas, mask = outpaint_canvas(image, (8, 0, 4, 0))
    assert canvas.size == (32, 20) and mask.size == (32, 20)
    m = np.asarray(mask)
    assert m[4:, 8:].max() == 0 and m[:4].min() == 255 and m[:, :8].min() == 255


def test_outpaint_generation_size(sd1):
    _, backend = sd1
    init = Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8))
    result = run(backend, _request(init_image=init, outpaint=(16, 0, 0, 8), strength=1.0))
    assert result.images[0].size == (SIZE + 16, SIZE + 8)


@pytest.mark.parametrize("mode,expect", [("just-resize", (40, 20)), ("crop-and-resize", (40, 20)),
                                         ("resize-and-fill", (40, 20))])
def test_resize_modes_give_the_requested_size(mode, expect):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8))
    out = resize_image(image, 40, 20, mode)
    assert out.size == expect
    if mode == "resize-and-fill":  # fitted 20x20 in the middle, borders stretched from its edge columns
        arr = np.asarray(out).astype(int)
        assert (arr[:, 0] == arr[:, 9]).all() and (arr[:, 39] == arr[:, 30]).all()


@pytest.mark.parametrize("kw,option", [({"width": 60}, "--width"), ({"steps": 0}, "--steps"),
                                       ({"strength": 1.5}, "--strength"), ({"sampler": "Euler b"}, "Euler a"),
                                       ({"clip_skip": 0}, "--clip-skip")])
def test_invalid_requests_fail_before_any_work(kw, option):
    with pytest.raises(UsageError) as e:
        _request(**kw).validate()
    assert option in str(e.value)
