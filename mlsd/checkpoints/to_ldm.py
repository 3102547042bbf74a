"""diffusers/transformers state dicts -> the original LDM single-file layout.

The reverse of what diffusers' single_file_utils reads. mlsd uses it to write
its demo model and test fixtures in the layout A1111 users download, so the
loader is always exercised on the real format; written independently of the
forward tables on purpose, so a round trip checks both.
"""

from __future__ import annotations

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    per = layers_per_block + 1
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        head = parts[0]
        if head == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + ".".join(parts[2:])
        elif head == "conv_in":
            new = "input_blocks.0.0." + ".".join(parts[1:])
        elif head == "conv_norm_out":
            new = "out.0." + ".".join(parts[1:])
        elif head == "conv_out":
            new = "out.2." + ".".join(parts[1:])
        elif head == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * per}.0.op.{'.'.join(parts[5:])}"
            else:
                j = int(parts[3])
                idx = 1 + i * per + j
                new = f"input_blocks.{idx}.0.{_rename(rest, _RESNET)}" if kind == "resnets" else \
                    f"input_blocks.{idx}.1.{rest}"
        elif head == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.1.{rest}" if kind == "attentions" else \
                f"middle_block.{0 if j == 0 else 2}.{_rename(rest, _RESNET)}"
        elif head == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
                new = f"output_blocks.{i * per + layers_per_block}.{2 if has_attn else 1}.{'.'.join(parts[4:])}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                idx = i * per + j
                new = f"output_blocks.{idx}.0.{_rename(rest, _RESNET)}" if kind == "resnets" else \
                    f"output_blocks.{idx}.1.{rest}"
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            level = i if side == "encoder" else n_blocks - 1 - i
            group = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                new = f"{side}.{group}.{level}.block.{parts[4]}.{_rename('.'.join(parts[5:]), _VAE_RESNET)}"
            else:  # downsamplers / upsamplers
                sample = "downsample" if side == "encoder" else "upsample"
                new = f"{side}.{group}.{level}.{sample}.{'.'.join(parts[5:])}"
        elif side in ("encoder", "decoder") and parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            if parts[2] == "attentions":
                new = f"{side}.mid.attn_1.{_rename(rest, _VAE_ATTN)}"
                if value.ndim == 2:  # LDM keeps the mid attention as 1x1 convolutions
                    value = value[:, :, None, None]
            else:
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{_rename(rest, _VAE_RESNET)}"
        elif side in ("encoder", "decoder") and parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{'.'.join(parts[2:])}"
        else:
            new = key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"cond_stage_model.transformer." + k: v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_open_clip(state: dict[str, torch.Tensor], extra_block: dict[str, torch.Tensor] | None = None,
                      projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD2) layout: fused q;k;v, ln_1/ln_2, mlp.c_fc/c_proj, ln_final."""
    p = "cond_stage_model.model."
    tm = "text_model."
    out = {
        p + "token_embedding.weight": state[tm + "embeddings.token_embedding.weight"],
        p + "positional_embedding": state[tm + "embeddings.position_embedding.weight"],
        p + "ln_final.weight": state[tm + "final_layer_norm.weight"],
        p + "ln_final.bias": state[tm + "final_layer_norm.bias"],
    }
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith(tm + "encoder.layers.")})
    blocks = [(i, {k[len(f"{tm}encoder.layers.{i}."):]: v for k, v in state.items()
                   if k.startswith(f"{tm}encoder.layers.{i}.")}) for i in layers]
    if extra_block is not None:
        blocks.append((len(layers), extra_block))
    for i, b in blocks:
        r = f"{p}transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[r + f"attn.in_proj_{suffix}"] = torch.cat(
                [b[f"self_attn.{n}_proj.{suffix}"] for n in ("q", "k", "v")], dim=0)
            out[r + f"attn.out_proj.{suffix}"] = b[f"self_attn.out_proj.{suffix}"]
            out[r + f"ln_1.{suffix}"] = b[f"layer_norm1.{suffix}"]
            out[r + f"ln_2.{suffix}"] = b[f"layer_norm2.{suffix}"]
            out[r + f"mlp.c_fc.{suffix}"] = b[f"mlp.fc1.{suffix}"]
            out[r + f"mlp.c_proj.{suffix}"] = b[f"mlp.fc2.{suffix}"]
    if projection is not None:
        out[p + "text_projection"] = projection
    return out
