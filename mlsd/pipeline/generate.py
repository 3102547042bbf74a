"""From a request to images: conditioning, start latents, the shared loop, decoding.

Generator use follows diffusers' pipelines call for call (initial noise, VAE
sampling, ancestral noise all from per-image CPU generators seeded seed+i), so
a seed gives the same image here, in diffusers, and on every backend.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from mlsd.backends.base import Backend
from mlsd.pipeline.images import overlay_inpaint, prepare_init_image, prepare_inpaint
from mlsd.pipeline.loop import DenoisePlan, InpaintBlend, denoise
from mlsd.pipeline.request import GenerationRequest, GenerationResult, Progress
from mlsd.pipeline.samplers import make_scheduler, resolve_sampler
from mlsd.prompts import apply_emphasis, chunks_to_tensors, equalize_chunk_counts, tokenize_weighted

MAX_SEED = 2**32 - 1


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed is None or seed < 0 else int(seed)


def encode_prompt_pair(backend: Backend, prompt: str, negative: str, clip_skip: int = 1):
    """A1111 conditioning: weighted 75-token chunks, encoded separately, concatenated along the sequence."""
    tok = backend.tokenizer
    pad = tok.pad_token_id
    cond, uncond = equalize_chunk_counts(tokenize_weighted(prompt, tok), tokenize_weighted(negative, tok), pad_id=pad)
    ids, weights = chunks_to_tensors(cond + uncond)
    hidden = apply_emphasis(backend.encode_tokens(ids, clip_skip), weights)
    n = len(cond)
    return hidden[:n].reshape(1, n * 77, -1), hidden[n:].reshape(1, n * 77, -1)


def sample_latents(moments: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
    """diffusers' DiagonalGaussianDistribution.sample, then the latent scale."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return scaling * (mean + std * noise)


def _noise(shape, generators, device) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]).to(device)


def _timesteps(scheduler, steps: int, strength: float, mode: str):
    scheduler.set_timesteps(steps)
    if mode == "txt2img":
        return scheduler.timesteps, steps
    run = min(int(steps * strength), steps)  # img2img runs strength x steps, as A1111 and diffusers do
    start = max(steps - run, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order:], steps - start


def plan_batch(backend: Backend, request: GenerationRequest, seeds: list[int], cond, uncond) -> DenoisePlan:
    traits = backend.traits
    device = getattr(backend, "device", "cpu")
    sampler = resolve_sampler(request.sampler)
    scheduler = make_scheduler(sampler, traits.scheduler_config, seed=seeds[0])
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    b = len(seeds)
    f = traits.vae_scale_factor
    width, height = request.output_size
    shape = (b, traits.latent_channels, height // f, width // f)
    mode = request.mode
    timesteps, total = _timesteps(scheduler, request.steps, request.strength, mode)
    if total < 1:
        from mlsd.errors import UsageError

        raise UsageError(f"strength {request.strength} x {request.steps} steps leaves no step to run.",
                         where="--strength", fix="raise --strength or --steps")
    guided = request.cfg_scale > 1.0
    conds, unconds = cond.expand(b, -1, -1), uncond.expand(b, -1, -1)
    context = torch.cat([unconds, conds]) if guided else conds  # diffusers' order: uncond first
    step_kwargs = _step_kwargs(scheduler, generators, request.eta)
    plan = DenoisePlan(scheduler, timesteps, None, context, request.cfg_scale, total, step_kwargs)

    if mode == "txt2img":
        plan.latents = _noise(shape, generators, device) * scheduler.init_noise_sigma
        return plan
    if mode == "img2img":
        image = prepare_init_image(request).to(device)
        init = torch.cat([sample_latents(backend.encode_image(image), g, traits.scaling_factor) for g in generators])
        noise = _noise(shape, generators, device)
        plan.latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(b))
        return plan

    image, mask = prepare_inpaint(request)  # (1,3,H,W) in [-1,1], (1,1,H,W) binary
    image, mask = image.to(device), mask.to(device)
    full_strength = request.strength == 1.0
    nine = traits.unet_in_channels == 9
    image_latents = None
    if not nine or not full_strength:
        image_latents = sample_latents(backend.encode_image(image), generators[0], traits.scaling_factor).repeat(
            b, 1, 1, 1)
    noise = _noise(shape, generators, device)
    if full_strength:
        plan.latents = noise * scheduler.init_noise_sigma
    else:
        plan.latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(b))
    latent_mask = torch.nn.functional.interpolate(mask, size=shape[2:]).repeat(b, 1, 1, 1)
    masked = sample_latents(backend.encode_image(image * (mask < 0.5)), generators[0], traits.scaling_factor)
    if nine:
        extra = torch.cat([latent_mask, masked.repeat(b, 1, 1, 1)], dim=1)
        plan.extra_channels = torch.cat([extra] * 2) if guided else extra
    else:
        plan.blend = InpaintBlend(image_latents, noise, latent_mask)
    return plan


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    import inspect

    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] tensors -> 8-bit RGB, rounded as diffusers does."""
    arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def generate(
    backend: Backend,
    request: GenerationRequest,
    cancel: threading.Event | None = None,
) -> Iterator[Progress | GenerationResult]:
    """Yields a Progress per step of every batch, then one GenerationResult."""
    request.validate(backend.traits.vae_scale_factor)
    start = time.perf_counter()
    base_seed = resolve_seed(request.seed)
    t0 = time.perf_counter()
    cond, uncond = encode_prompt_pair(backend, request.prompt, request.negative_prompt, request.clip_skip)
    timings = {"text_encoder": time.perf_counter() - t0, "denoise": 0.0, "vae_decode": 0.0}
    images: list[Image.Image] = []
    seeds: list[int] = []
    for batch in range(request.batch_count):
        batch_seeds = [base_seed + batch * request.batch_size + i for i in range(request.batch_size)]
        plan = plan_batch(backend, request, batch_seeds, cond, uncond)
        latents = plan.latents
        t0 = time.perf_counter()
        for step in denoise(backend, plan, cancel):
            latents = step.latents
            yield Progress(batch, request.batch_count, step.step, step.total, latents, step.elapsed)
        timings["denoise"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = to_pil(backend.decode(latents))
        images += overlay_inpaint(decoded, request) if request.mode == "inpaint" and request.overlay else decoded
        timings["vae_decode"] += time.perf_counter() - t0
        seeds += batch_seeds
    request.seed = base_seed
    yield GenerationResult(images, seeds, request, time.perf_counter() - start, timings)


def run(backend: Backend, request: GenerationRequest, cancel=None) -> GenerationResult:
    """generate() for callers that want only the result."""
    result = None
    for event in generate(backend, request, cancel):
        result = event
    return result
