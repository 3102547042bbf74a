"""Tiny, seeded, random-weight SD-architecture models written as A1111 single files.

Used by the test suite and by ``make demo`` before a trained demo model exists.
The file has the exact layout of a downloaded checkpoint (LDM keys, optional
EMA copy and training keys, sidecar .yaml for the non-standard size), so every
load goes through the same code a real checkpoint does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mlsd.checkpoints.to_ldm import clip_to_ldm, clip_to_open_clip, unet_to_ldm, vae_to_ldm
from mlsd.families import FAMILIES

UNET_CHANNELS = 32
UNET_MULT = [1, 2]
UNET_LAYERS = 2
VAE_CHANNELS = 32
VAE_MULT = [1, 2, 2, 2]  # 8x downsampling, like the real VAE
TEXT_WIDTH = 64
TEXT_LAYERS = 2
VOCAB = 49408


@dataclass
class TinyModel:
    """The components the file was written from, in diffusers naming, for comparison."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    ldm: dict[str, torch.Tensor]
    config: dict


def ldm_config(family: str = "sd1", inpainting: bool = False) -> dict:
    """The family's LDM config shrunk to tiny sizes (what the sidecar .yaml holds)."""
    cfg = copy.deepcopy(FAMILIES[family].ldm_config(inpainting))
    params = cfg["model"]["params"]
    unet = params["unet_config"]["params"]
    unet.update(model_channels=UNET_CHANNELS, channel_mult=UNET_MULT, num_res_blocks=UNET_LAYERS,
                attention_resolutions=[1], context_dim=TEXT_WIDTH if family == "sd1" else TEXT_WIDTH * 2)
    if family == "sd2":
        unet["num_head_channels"] = 8
    else:
        unet["num_heads"] = 4
    params["first_stage_config"]["params"]["ddconfig"].update(ch=VAE_CHANNELS, ch_mult=VAE_MULT, num_res_blocks=1)
    return cfg


def build_tiny(family: str = "sd1", *, inpainting: bool = False, seed: int = 0) -> TinyModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = ldm_config(family, inpainting)
    torch.manual_seed(seed)
    unet_cfg = create_unet_diffusers_config_from_ldm(cfg, {})
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(cfg, {}))
    # SD2 reads the text encoder at its penultimate block, and the file has one block more.
    width = TEXT_WIDTH if family == "sd1" else TEXT_WIDTH * 2
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=width * 2, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=width // 64, max_position_embeddings=77,
        hidden_act="quick_gelu" if family == "sd1" else "gelu"))
    _randomise(unet, vae, te)
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    # Canonical (transformers 4 / LDM) naming, whatever the installed transformers calls it.
    te_sd = {("" if k.startswith("text_model.") else "text_model.") + k: v
             for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    ldm = unet_to_ldm(unet_sd, UNET_LAYERS) | vae_to_ldm(vae_sd, len(VAE_MULT))
    if family == "sd1":
        ldm |= clip_to_ldm(te_sd)
    else:
        spare = {k.split(".", 4)[-1]: torch.randn_like(v) for k, v in te_sd.items()
                 if k.startswith("text_model.encoder.layers.0.")}
        ldm |= clip_to_open_clip(te_sd, spare, projection=torch.randn(width, width))
    return TinyModel(unet_sd, vae_sd, te_sd, ldm, cfg)


def _randomise(*modules: torch.nn.Module) -> None:
    """Default inits leave zeroed output convs and unit norms; a test must see every weight matter."""
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.copy_(torch.randn_like(p) * 0.05 + (1.0 if name.endswith("weight") else 0.0))
                else:
                    fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                    p.copy_(torch.randn_like(p) / fan_in**0.5)


def write_checkpoint(
    path: str | Path,
    family: str = "sd1",
    *,
    inpainting: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
    training_keys: bool = True,
    nest_state_dict: bool = False,
    sidecar: bool = True,
) -> TinyModel:
    """Write a tiny checkpoint as .safetensors or .ckpt (by suffix), plus its sidecar .yaml."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_tiny(family, inpainting=inpainting, seed=seed)
    sd = {k: v.to(dtype).contiguous() for k, v in model.ldm.items()}
    if ema:
        # The EMA copy differs from the live weights, so a test can tell which one loaded.
        sd |= {"model_ema." + "".join(k.split(".")[1:]): (v + 0.01).contiguous()
               for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    if training_keys:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        sd |= {"betas": betas.to(dtype), "alphas_cumprod": torch.cumprod(1 - betas, 0).to(dtype)}
    if path.suffix == ".safetensors":
        save_file(sd, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": sd, "global_step": 1} if nest_state_dict else sd, path)
    if sidecar:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(model.config, sort_keys=False), encoding="utf-8")
    return model
