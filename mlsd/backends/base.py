"""The interface every backend implements (PyTorch, Core ML, Core ML reference executor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class ModelTraits:
    """What the shared loop needs to know about a model, whatever runs it."""

    family: str  # "sd1" | "sd2"
    prediction_type: str
    scheduler_config: dict
    latent_channels: int
    unet_in_channels: int  # 9 for inpainting checkpoints
    vae_scale_factor: int  # pixels per latent
    scaling_factor: float  # latent scale (0.18215 for SD1/SD2)


class Backend(Protocol):
    name: str
    traits: ModelTraits
    tokenizer: object

    def encode_tokens(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """(n, 77) token ids -> (n, 77, C) float32 hidden states; clip_skip in A1111's meaning."""

    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, 4|9, h, w), timestep, (B, S, C) -> (B, 4, h, w) float32."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) float32 in [-1, 1]."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> moments (B, 2*latent_channels, h, w): mean then log-variance."""
