"""Cheap live previews: SD latents to RGB by a fixed linear map, no VAE decode per step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch

# The widely used "latent preview" factors for SD 1.x/2.x latents (rows: latent channels, columns: R, G, B),
# as in A1111's "Approx cheap" live preview; output is roughly in [-1, 1].
LATENT_RGB_FACTORS = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
]  # fmt: skip


def latent_preview(latents: torch.Tensor, size: tuple[int, int] | None = None, max_side: int = 512) -> Image.Image:
    """The first image of a (B, C, h, w) latent batch as an RGB picture, upscaled to ``size`` (at most max_side)."""
    import torch

    latent = latents[0].detach().float().cpu()
    if latent.shape[0] == len(LATENT_RGB_FACTORS):
        rgb = torch.einsum("chw,cr->rhw", latent, torch.tensor(LATENT_RGB_FACTORS))
    else:  # another latent space: a grey picture is honest where these factors would lie
        rgb = latent.mean(0, keepdim=True).expand(3, -1, -1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(pixels, "RGB")
    width, height = size or (image.width * 8, image.height * 8)
    scale = min(1.0, max_side / max(width, height))
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
