"""A full-size SD1.5-shaped checkpoint with random weights, written in the A1111 single-file layout.

The benches need the real sizes (860 M UNet parameters, 123 M text encoder, 84 M VAE) without
downloading anything; random weights cost nothing in speed or memory compared with trained ones.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_sd15(seed: int = 0):
    """(unet, vae, text_encoder) as diffusers/transformers modules, SD1.5's exact shapes, fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from mlsd.families import FAMILIES

    cfg = FAMILIES["sd1"].ldm_config(False)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(cfg, {}))
    vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(cfg, {}))
    # openai/clip-vit-large-patch14's text tower.
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      hidden_act="quick_gelu", projection_dim=768))
    return unet.eval(), vae.eval(), te.eval()


def write_sd15(path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the checkpoint (fp16 by default, as most downloads are) unless it is already there."""
    from safetensors.torch import save_file

    from mlsd.checkpoints.to_ldm import clip_to_ldm, unet_to_ldm, vae_to_ldm

    path = Path(path)
    if path.is_file():
        return path
    unet, vae, te = build_sd15(seed)
    te_sd = {("" if k.startswith("text_model.") else "text_model.") + k: v
             for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    ldm = unet_to_ldm(unet.state_dict(), 2) | vae_to_ldm(vae.state_dict(), 4) | clip_to_ldm(te_sd)
    del unet, vae, te
    ldm = {k: v.to(dtype).contiguous() for k, v in ldm.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(ldm, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import sys

    print(write_sd15(sys.argv[1] if len(sys.argv) > 1 else "bench-cache/sd15-random-fp16.safetensors"))
