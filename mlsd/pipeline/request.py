"""What a user asks for and what comes back: plain dataclasses shared by CLI, UI and backends."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from mlsd.errors import UsageError
from mlsd.pipeline.samplers import DEFAULT_SAMPLER, resolve_sampler

RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    sampler: str = DEFAULT_SAMPLER
    width: int = 512
    height: int = 512
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    eta: float = 0.0
    init_image: Image.Image | None = None
    strength: float = 0.75
    resize_mode: str = "just-resize"
    mask: Image.Image | None = None
    mask_blur: int = 4
    outpaint: tuple[int, int, int, int] | None = None  # left, right, up, down pixels
    overlay: bool = True  # inpainting: paste the original back outside the (blurred) mask, as A1111 does

    def validate(self, latent_multiple: int = 8) -> None:
        """Fail before any work starts, naming the option and the valid range."""
        problems = []
        if self.width % latent_multiple or self.height % latent_multiple or self.width <= 0 or self.height <= 0:
            problems.append((f"size {self.width}x{self.height} is not a positive multiple of {latent_multiple}",
                             "--width/--height", f"use e.g. {self.width // latent_multiple * latent_multiple or 512}"))
        if self.steps < 1:
            problems.append((f"steps {self.steps} < 1", "--steps", "use 1 or more (20 is typical)"))
        if not 0.0 <= self.strength <= 1.0:
            problems.append((f"strength {self.strength} is outside 0-1", "--strength", "use e.g. 0.75"))
        if self.cfg_scale < 0:
            problems.append((f"CFG scale {self.cfg_scale} is negative", "--cfg-scale", "use e.g. 7"))
        if self.batch_size < 1 or self.batch_count < 1:
            problems.append(("batch size and count must be >= 1", "--batch-size/--batch-count", "use 1"))
        if self.clip_skip < 1:
            problems.append((f"clip skip {self.clip_skip} < 1", "--clip-skip", "1 = last layer, 2 = penultimate"))
        if self.resize_mode not in RESIZE_MODES:
            problems.append((f"resize mode '{self.resize_mode}'", "--resize-mode", f"use {', '.join(RESIZE_MODES)}"))
        if (self.mask is not None or self.outpaint) and self.init_image is None:
            problems.append(("a mask or outpaint needs an init image", "--init-image", "pass --init-image"))
        if self.outpaint and (len(self.outpaint) != 4 or min(self.outpaint) < 0):
            problems.append(("outpaint needs four non-negative pixel counts", "--outpaint", "e.g. 64,64,0,0"))
        out_w, out_h = self.output_size if not problems else (self.width, self.height)
        if (out_w % latent_multiple or out_h % latent_multiple) and not problems:
            problems.append((f"outpainted size {out_w}x{out_h} is not a multiple of {latent_multiple}",
                             "--outpaint", f"use pixel counts that are multiples of {latent_multiple}"))
        if problems:
            what, where, fix = problems[0]
            raise UsageError(f"Invalid request: {what}.", where=where, fix=fix)
        resolve_sampler(self.sampler)

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images made: outpainting grows the canvas."""
        if self.outpaint and self.init_image is not None:
            left, right, up, down = self.outpaint
            return self.width + left + right, self.height + up + down
        return self.width, self.height

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if (self.mask is not None or self.outpaint) else "img2img"


@dataclass
class Progress:
    """One completed sampling step of one batch."""

    batch: int  # 0-based
    batch_count: int
    step: int
    total: int
    latents: torch.Tensor
    elapsed: float

    @property
    def it_per_s(self) -> float:
        return self.step / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    request: GenerationRequest
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
