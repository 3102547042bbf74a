"""Tell what a weights file is from its tensors (names and shapes), never its file name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mlsd.errors import UnknownModelError, UnsupportedModelError
from mlsd.families import SD1, SD2, Family

UNET = "model.diffusion_model."
CLIP_TE = "cond_stage_model.transformer."
OPENCLIP_TE = "cond_stage_model.model."
VAE = "first_stage_model."
EMA = "model_ema."
_UNET_IN = UNET + "input_blocks.0.0.weight"
_ATTN2_K = re.compile(r"^model\.diffusion_model\..*attn2\.to_k\.weight$")

# Architectures people download that mlsd recognises but does not run yet.
_UNSUPPORTED = [
    ("SDXL", ("conditioner.embedders.", UNET + "label_emb.")),
    ("Stable Diffusion 3", (UNET + "joint_blocks.", "joint_blocks.")),
    ("Flux", (UNET + "double_blocks.", "double_blocks.")),
    ("Stable Cascade", ("clip_txt_mapper.", "down_blocks.1.0.channelwise.")),
]
_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1", "lora_unet_", "lora_te")


@dataclass(frozen=True)
class Detection:
    kind: str  # "checkpoint" | "vae" | "lora"
    family: Family | None = None
    inpainting: bool = False
    has_unet: bool = False
    has_text_encoder: bool = False
    has_vae: bool = False
    has_ema: bool = False
    in_channels: int = 4
    context_dim: int | None = None


def detect(tensors: dict[str, torch.Tensor], path: Path | str | None = None) -> Detection:
    keys = tensors.keys()
    for name, prefixes in _UNSUPPORTED:
        if any(k.startswith(prefixes) for k in keys):
            raise UnsupportedModelError(
                f"This is a {name} model; mlsd runs Stable Diffusion 1.x and 2.x so far.",
                where=path,
                fix="pick an SD 1.x or 2.x checkpoint (SDXL support is planned)",
            )
    if any(m in k for k in keys for m in _LORA_MARKERS):
        return Detection("lora")
    has_unet = _UNET_IN in tensors
    has_te = any(k.startswith((CLIP_TE, OPENCLIP_TE)) for k in keys)
    if not has_unet and not has_te:
        if _looks_like_vae(keys):
            return Detection("vae", has_vae=True)
        raise UnknownModelError(
            "No Stable Diffusion fingerprint found (no UNet 'model.diffusion_model.input_blocks.0.0.weight', "
            f"no text encoder). Top-level key groups found: {', '.join(key_groups(keys)) or '(none)'}.",
            where=path,
            fix="check the file is a Stable Diffusion checkpoint, VAE or LoRA",
        )
    context = next((int(t.shape[1]) for k, t in tensors.items() if _ATTN2_K.match(k)), None)
    te_family = SD2 if any(k.startswith(OPENCLIP_TE) for k in keys) else SD1 if has_te else None
    unet_family = {SD1.context_dim: SD1, SD2.context_dim: SD2}.get(context) if context else None
    if te_family and unet_family and te_family is not unet_family:
        raise UnknownModelError(
            f"Text encoder is {te_family.label}-style but the UNet's cross-attention is {context} wide.",
            where=path,
            fix="the checkpoint mixes families; re-export it from its training tool",
        )
    family = te_family or unet_family or SD1
    in_channels = int(tensors[_UNET_IN].shape[1]) if has_unet else 4
    return Detection(
        kind="checkpoint",
        family=family,
        inpainting=in_channels == 9,
        has_unet=has_unet,
        has_text_encoder=has_te,
        has_vae=any(k.startswith(VAE) for k in keys),
        has_ema=any(k.startswith(EMA) for k in keys),
        in_channels=in_channels,
        context_dim=context,
    )


def _looks_like_vae(keys) -> bool:
    stripped = {k.removeprefix(VAE) for k in keys}
    return any(k.startswith(("decoder.conv_in.", "decoder.up.", "decoder.up_blocks.")) for k in stripped)


def key_groups(keys, limit: int = 8) -> list[str]:
    groups: list[str] = []
    for k in keys:
        g = ".".join(k.split(".")[:2])
        if g not in groups:
            groups.append(g)
        if len(groups) >= limit:
            break
    return groups
