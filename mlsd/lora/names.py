"""Resolve LoRA module names against the diffusers UNet and transformers CLIP text encoders.

kohya names are ``prefix + module_path.replace(".", "_")``; the underscores are ambiguous, so names are
never parsed: every module of the model is spelled every way a trainer could spell it and looked up.

Original-LDM (``input_blocks_4_1_...``) UNet names are derived from the model's own block structure.
diffusers has ``_maybe_map_sgm_blocks_to_diffusers`` for this, but it assumes the SDXL layout: on SD1 it
maps ``output_blocks_2_1_conv`` (an upsampler: that block has no attention) to ``attentions``, and its
``input_blocks_1`` prefix test also swallows ``input_blocks_10``/``_11`` and then raises KeyError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mlsd.errors import LoraError
from mlsd.lora.formats import LoraFile, LoraModule
from mlsd.lora.math import natural_shape

SD1, SD2, SDXL = "SD1", "SD2", "SDXL"
_CROSS_ATTN_WIDTH = {768: SD1, 1024: SD2, 2048: SDXL}
_TE_WIDTH = {1024: SD2, 1280: SDXL}  # 768 is SD1 or SDXL's first encoder, so it proves nothing alone
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


@dataclass
class ModuleIndex:
    """Every spelling of every module of one model -> its real dotted name."""

    model: nn.Module
    modules: dict[str, nn.Module]
    underscored: dict[str, str]
    dotted: dict[str, str]

    @classmethod
    def build(cls, model: nn.Module, *, is_unet: bool) -> ModuleIndex:
        modules = dict(model.named_modules())
        ldm = _ldm_block_names(model) if is_unet else {}
        dotted: dict[str, str] = {}
        for name in modules:
            if not name:
                continue
            spellings = [name]
            if not is_unet:
                # transformers 5 dropped CLIPTextModel's `text_model.` level; trainers write either form.
                root = "text_model."
                spellings.append(name[len(root):] if name.startswith(root) else root + name)
            if ldm and (alias := _ldm_name(name, ldm)):
                spellings.append(alias)
            for s in spellings:
                dotted.setdefault(s, name)
        return cls(model, modules, {k.replace(".", "_"): v for k, v in dotted.items()}, dotted)

    def resolve(self, m: LoraModule) -> str | None:
        return (self.dotted if m.dotted else self.underscored).get(m.name)


def _ldm_block_names(unet: nn.Module) -> dict[str, str]:
    """diffusers block path -> LDM block path, by walking the blocks the way LDM numbers them."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks", "mid_block")):
        return {}
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    i = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(block.resnets)):
            m[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if attentions:
                m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if getattr(block, "downsamplers", None):
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    mid = unet.mid_block
    if mid is not None:  # LDM interleaves: resnet, attention, resnet, ...
        for j in range(len(mid.resnets)):
            m[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
        for j in range(len(getattr(mid, "attentions", None) or [])):
            m[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
    i = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(block.resnets)):
            m[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            if attentions:
                m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            i += 1
        if getattr(block, "upsamplers", None):  # shares the last layer's LDM index, after its attention
            m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i - 1}.{2 if attentions else 1}.conv"
    return m


def _ldm_name(name: str, blocks: dict[str, str]) -> str | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in blocks:
            rest = parts[n:]
            if rest and ".resnets." in f".{head}.":
                rest = [*_RESNET_LDM.get(rest[0], rest[0]).split("."), *rest[1:]]
            return ".".join([blocks[head], *rest])
    return None


def model_family(unet: nn.Module, text_encoder_2: nn.Module | None = None) -> str:
    cfg = getattr(unet, "config", None)
    if text_encoder_2 is not None or getattr(cfg, "addition_embed_type", None) == "text_time":
        return SDXL
    width = getattr(cfg, "cross_attention_dim", None)
    return _CROSS_ATTN_WIDTH.get(width, f"a custom model (cross-attention width {width})")


def lora_family(lora: LoraFile) -> tuple[str | None, str]:
    """(family, the evidence in words), strongest evidence first: key layout, shapes, then metadata."""
    if any(m.key.startswith(("lora_te1_", "lora_te2_")) or m.target == "text_encoder_2" for m in lora.modules):
        return SDXL, "it has lora_te1_/lora_te2_ keys, one set per SDXL text encoder"
    for suffixes, table, what in ((("attn2_to_k", "attn2_to_v"), _CROSS_ATTN_WIDTH, "cross-attention"),
                                  (("self_attn_q_proj", "self_attn_k_proj"), _TE_WIDTH, "text-encoder")):
        for m in lora.modules:
            if m.name.replace(".", "_").endswith(suffixes) and (width := _in_features(m)) in table:
                return table[width], f"its {what} layers take {width}-wide inputs"
    md = lora.summary
    version = (md.base_model_version or "").lower()
    if version:
        family = SDXL if "sdxl" in version else SD2 if version.startswith("sd_v2") else (
            SD1 if version.startswith("sd_v1") else version)
        return family, f"its metadata says ss_base_model_version={md.base_model_version}"
    if md.v2 is not None:
        return (SD2 if md.v2 else SD1), f"its metadata says ss_v2={md.v2}"
    return None, "neither its metadata nor its shapes say which model it was trained for"


def _in_features(m: LoraModule) -> int | None:
    try:
        return natural_shape(m)[1]
    except LoraError:
        return None


def target_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a LoRA may update: only Linear and Conv2d, the layers trainers attach LoRA to."""
    return module.weight if isinstance(module, nn.Linear | nn.Conv2d) else None
