"""The one denoising loop. Backends only predict noise; everything else happens here, once.

It mirrors diffusers' Stable Diffusion pipelines step for step (same scheduler
calls, same generator use, same guidance arithmetic) so that the PyTorch
backend reproduces them and every other backend is checked against it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


class NoisePredictor(Protocol):
    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents (B, 4|9, h, w), timestep scalar, context (B, S, C) -> noise prediction (B, 4, h, w)."""


@dataclass
class InpaintBlend:
    """For ordinary (4-channel) checkpoints: keep the unmasked area on the init image's noise path."""

    image_latents: torch.Tensor  # (B, 4, h, w), scaled
    noise: torch.Tensor  # the noise the start latents were made with
    mask: torch.Tensor  # (B, 1, h, w), 1 = repaint


@dataclass
class DenoisePlan:
    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor
    context: torch.Tensor  # [uncond; cond] when guidance applies, else cond
    guidance_scale: float
    total_steps: int  # the steps a user asked for, as A1111 counts them
    step_kwargs: dict
    extra_channels: torch.Tensor | None = None  # 9-channel inpainting: mask + masked-image latents
    blend: InpaintBlend | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class StepResult:
    step: int  # 1-based, counts requested steps even when a sampler evaluates the UNet twice per step
    total: int
    latents: torch.Tensor
    elapsed: float  # seconds since the loop started
    evaluations: int  # UNet calls so far


class Cancelled(Exception):
    """Raised by the loop when its cancel event is set; the caller decides what to keep."""


def denoise(model: NoisePredictor, plan: DenoisePlan, cancel: threading.Event | None = None) -> Iterator[StepResult]:
    scheduler, timesteps = plan.scheduler, plan.timesteps
    latents = plan.latents
    n_evals = len(timesteps)
    reported = 0
    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after {reported} of {plan.total_steps} steps")
        model_in = torch.cat([latents] * 2) if plan.guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if plan.extra_channels is not None:
            model_in = torch.cat([model_in, plan.extra_channels], dim=1)
        noise = model.predict_noise(model_in, t, plan.context)
        if plan.guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + plan.guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, **plan.step_kwargs, return_dict=False)[0]
        if plan.blend is not None:
            latents = _blend(scheduler, plan.blend, latents, timesteps, i)
        done = (i + 1) * plan.total_steps // n_evals  # second-order samplers report every other call
        if done > reported:
            reported = done
            yield StepResult(done, plan.total_steps, latents, time.perf_counter() - start, i + 1)


def _blend(scheduler, blend: InpaintBlend, latents, timesteps, i):
    proper = blend.image_latents
    if i < len(timesteps) - 1:
        proper = scheduler.add_noise(proper, blend.noise, torch.tensor([timesteps[i + 1]]))
    return (1 - blend.mask) * proper + blend.mask * latents
