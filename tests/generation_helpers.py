"""Shared helpers for generation tests: PSNR and diffusers reference pipelines on the same weights."""

from __future__ import annotations

import torch

from mlsd.pipeline.images import image_psnr as psnr  # noqa: F401  (the tests' name for it)
from mlsd.pipeline.samplers import make_scheduler, resolve_sampler

GATE_DB = 40.0


def reference(kind: str, model, sampler: str, seed: int, **kwargs):
    """diffusers' own pipeline on the model's modules, with the scheduler mlsd maps the sampler to."""
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = cls(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
               scheduler=make_scheduler(resolve_sampler(sampler), model.scheduler_config, seed=seed),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n = kwargs.pop("num_images_per_prompt", 1)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    return pipe(generator=generators, num_images_per_prompt=n, **kwargs).images
