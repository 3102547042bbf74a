"""Fallback generation: mlsd's torch backend vs diffusers' own StableDiffusionPipeline, same weights.

Both drive the very same UNet/VAE/text-encoder modules, so any difference is the loop around them.
Time per step = from the first UNet call's start to the last one's end, over the step count: it
includes each side's scheduler and guidance arithmetic, not text encoding or VAE decoding.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.measure import median_pairs, peak_rss_bytes
from mlsd.backends.torch_backend import has_cpp_compiler
from mlsd.pipeline.images import image_psnr

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"


class UNetClock:
    """Forward hooks on a UNet: first call start and last call end of the latest run, plus per-call times."""

    def __init__(self, unet: torch.nn.Module):
        self.calls: list[float] = []
        self.first = self.last = 0.0
        self._start = 0.0
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def reset(self) -> None:
        self.calls, self.first, self.last = [], 0.0, 0.0

    def _pre(self, *_):
        self._start = time.perf_counter()
        self.first = self.first or self._start

    def _post(self, *_):
        self.last = time.perf_counter()
        self.calls.append(self.last - self._start)

    def per_step(self, steps: int) -> float:
        return (self.last - self.first) / steps


def _diffusers_pipe(model, sampler: str):
    import diffusers

    from mlsd.pipeline.samplers import make_scheduler, resolve_sampler

    pipe = diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(resolve_sampler(sampler), model.scheduler_config, seed=0),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_generation(checkpoint: Path, *, size: int = 256, steps: int = 4, pairs: int = 5,
                     sampler: str = "Euler", seed: int = 1) -> dict:
    from mlsd.pipeline.request import GenerationRequest

    def request():
        return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=7.0, seed=seed,
                                 sampler=sampler, width=size, height=size)

    # fp32 pairs first, in their own frame, so their model is freed before each CPU mode loads its copy.
    out, fp32_image = _bench_fp32(checkpoint, request, size, steps, pairs, sampler, seed)
    out["modes"] = [_bench_mode(checkpoint, mode, request, steps, fp32_image) for mode in _MODES
                    if mode[2] is not _compiled or has_cpp_compiler()]
    return out


def _bench_fp32(checkpoint, request, size, steps, pairs, sampler, seed):
    from mlsd.backends.torch_backend import TorchBackend
    from mlsd.checkpoints.load import load_model
    from mlsd.pipeline.generate import run

    model = load_model(checkpoint, dtype=torch.float32)
    backend = TorchBackend(model, device="cpu", precision="fp32")
    pipe = _diffusers_pipe(model, sampler)
    clock = UNetClock(model.unet)
    per_step = {"mlsd": [], "diffusers": []}
    images = {}

    def ours():
        clock.reset()
        images["mlsd"] = run(backend, request()).images[0]
        per_step["mlsd"].append(clock.per_step(steps))

    def theirs():
        clock.reset()
        images["diffusers"] = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                                   height=size, width=size,
                                   generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        per_step["diffusers"].append(clock.per_step(steps))

    ours()  # warm-up: first-call allocations and kernel selection, for neither side to pay
    per_step["mlsd"].clear()
    wall_ours, wall_theirs, _ = median_pairs(ours, theirs, pairs)
    fp32_image = np.asarray(images["mlsd"], np.float64)
    out = {
        "size": size, "steps": steps, "sampler": sampler, "pairs": pairs, "threads": torch.get_num_threads(),
        "mlsd_step_s": statistics.median(per_step["mlsd"]),
        "diffusers_step_s": statistics.median(per_step["diffusers"]),
        # Each pair ran back to back, so its ratio is the like-for-like figure; their median resists the
        # few-percent drift of a shared 2-core machine better than a ratio of two medians.
        "step_ratio": statistics.median(a / b for a, b in zip(per_step["mlsd"], per_step["diffusers"], strict=True)),
        "per_step": per_step,
        "mlsd_wall_s": wall_ours, "diffusers_wall_s": wall_theirs,
        "psnr_mlsd_vs_diffusers": image_psnr(fp32_image, np.asarray(images["diffusers"], np.float64)),
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }
    out["preview"] = _bench_preview(backend, request(), steps)
    out["unet_gflop_per_step"] = _unet_gflop(model.unet, size)
    return out, fp32_image


def _unet_gflop(unet, size: int) -> float:
    """FLOPs of one guided step's UNet call (batch 2), counted by torch: with the CPU's peak, the ceiling
    on any fp32 speed-up."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    latent = torch.zeros(2, cfg.in_channels, size // 8, size // 8)
    context = torch.zeros(2, 77, cfg.cross_attention_dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(latent, torch.tensor([500, 500]), encoder_hidden_states=context)
    return counter.get_total_flops() / 1e9


def _bench_preview(backend, request, steps: int) -> dict:
    """The TUI's per-step latent->RGB preview, timed inside a real generation, against the step time."""
    from mlsd.pipeline.generate import generate
    from mlsd.pipeline.request import Progress
    from tui.preview import latent_preview

    previews = []
    t0 = time.perf_counter()
    for event in generate(backend, request):
        if isinstance(event, Progress):
            start = time.perf_counter()
            latent_preview(event.latents)
            previews.append(time.perf_counter() - start)
        else:
            denoise = event.timings["denoise"]
    wall = time.perf_counter() - t0
    return {"preview_ms": 1000 * statistics.median(previews), "step_s": denoise / steps,
            "overhead": sum(previews) / (denoise - sum(previews)), "wall_s": wall}


def _channels_last(backend) -> None:
    for module in (backend.model.unet, backend.model.vae):
        module.to(memory_format=torch.channels_last)


def _compiled(backend) -> None:
    from mlsd.backends.torch_backend import compile_forward

    compile_forward(backend.model.unet, backend.device)


# (name, precision, tweak): the CPU modes mlsd can run, each on a fresh copy of the model.
# (bf16 channels-last is no longer run, to keep the run short.)
_MODES = [("fp32 channels-last", "fp32", _channels_last), ("fp32 --compile (inductor, frozen weights)", "fp32", _compiled),
          ("bf16", "bf16", None)]


def _bench_mode(checkpoint, mode, request, steps, fp32_image) -> dict:
    from mlsd.backends.torch_backend import TorchBackend
    from mlsd.checkpoints.load import load_model
    from mlsd.pipeline.generate import run

    name, precision, tweak = mode
    model = load_model(checkpoint, dtype=torch.float32)
    backend = TorchBackend(model, device="cpu", precision=precision)
    if tweak:
        tweak(backend)
    clock = UNetClock(model.unet)
    t0 = time.perf_counter()
    run(backend, request())  # warm-up (and, for --compile, the compilation)
    warmup = time.perf_counter() - t0
    times, image = [], None
    for _ in range(2):
        clock.reset()
        image = run(backend, request()).images[0]
        times.append(clock.per_step(steps))
    return {"mode": name, "step_s": statistics.median(times), "warmup_s": warmup,
            "psnr_vs_fp32": image_psnr(np.asarray(image, np.float64), fp32_image)}

