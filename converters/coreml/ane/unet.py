"""The ANE-friendly UNet: same topology and parameter shapes as diffusers' UNet2DConditionModel (SD1/SD2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from converters.coreml.ane.attention import DEFAULT_QUERY_CHUNK, AttentionImpl, SpatialTransformer
from converters.coreml.ane.layers import (
    Downsample,
    ResnetBlock,
    SinusoidalTimesteps,
    TimestepEmbedding,
    Upsample,
)
from converters.coreml.ane.weights import convert_diffusers_state_dict

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"

# Config values outside SD1/SD2 that would change the graph; refusing them beats a silently wrong model.
_REQUIRED = {
    "act_fn": "silu", "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
    "attention_type": "default", "resnet_out_scale_factor": 1.0,
}
_MUST_BE_FALSY = (
    "class_embed_type", "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type",
    "time_cond_proj_dim", "num_class_embeds", "time_embedding_act_fn", "timestep_post_act",
    "dual_cross_attention", "only_cross_attention", "mid_block_only_cross_attention", "resnet_skip_time_act",
    "class_embeddings_concat", "cross_attention_norm", "num_attention_heads",
    "reverse_transformer_layers_per_block",
)


def _per_block(value: Any, n: int, name: str) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} blocks")
    if any(isinstance(v, Sequence) for v in values):
        raise NotImplementedError(f"nested {name} (SDXL-style) is not supported")
    return values


@dataclass(frozen=True)
class UNetSpec:
    """The subset of a diffusers UNet config this module understands, normalised to per-block lists."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]
    heads: tuple[int, ...]
    cross_attention_dim: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    groups: int
    eps: float
    time_embed_dim: int
    flip_sin_to_cos: bool
    freq_shift: float
    downsample_padding: int
    mid_block_scale_factor: float
    conv_in_kernel: int
    conv_out_kernel: int
    center_input_sample: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetSpec:
        cfg = dict(config)
        for key, expected in _REQUIRED.items():
            if cfg.get(key, expected) != expected:
                raise NotImplementedError(
                    f"unsupported UNet config {key}={cfg[key]!r} (expected {expected!r})")
        for key in _MUST_BE_FALSY:
            value = cfg.get(key)
            # Per-block flags come as lists: [False, False] is still "off".
            if any(value) if isinstance(value, list | tuple) else value:
                raise NotImplementedError(f"unsupported UNet config {key}={cfg[key]!r}")
        down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
        if set(down) - {CROSS_DOWN, PLAIN_DOWN} or set(up) - {CROSS_UP, PLAIN_UP}:
            raise NotImplementedError(f"unsupported block types {down} / {up}")
        # An explicit None means "no mid block" to diffusers, which SD never uses.
        if cfg.get("mid_block_type", MID) != MID:
            raise NotImplementedError(f"unsupported mid block {cfg['mid_block_type']!r}")
        if cfg.get("norm_num_groups") is None:
            raise NotImplementedError("UNets without norm_num_groups are not supported")
        channels = tuple(cfg["block_out_channels"])
        n = len(channels)
        # diffusers quirk: `attention_head_dim` is really the head *count* when num_attention_heads is unset.
        heads = _per_block(cfg.get("attention_head_dim", 8), n, "attention_head_dim")
        return cls(
            in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], block_out_channels=channels,
            down_block_types=down, up_block_types=up,
            layers_per_block=tuple(_per_block(cfg["layers_per_block"], n, "layers_per_block")),
            heads=tuple(int(h) for h in heads),
            cross_attention_dim=tuple(_per_block(cfg["cross_attention_dim"], n, "cross_attention_dim")),
            transformer_layers=tuple(
                _per_block(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")),
            groups=cfg["norm_num_groups"], eps=cfg.get("norm_eps", 1e-5),
            time_embed_dim=cfg.get("time_embedding_dim") or channels[0] * 4,
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
            downsample_padding=cfg.get("downsample_padding", 1),
            mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0),
            conv_in_kernel=cfg.get("conv_in_kernel", 3), conv_out_kernel=cfg.get("conv_out_kernel", 3),
            center_input_sample=bool(cfg.get("center_input_sample", False)),
        )


class UNetBlock(nn.Module):
    """A down or up block: resnets, each optionally followed by a transformer, then a resampler.

    Attribute names follow diffusers (resnets / attentions / downsamplers / upsamplers) so the weight
    mapping stays a near-identity.
    """

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer],
                 downsample: Downsample | None = None, upsample: Upsample | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        if downsample is not None:
            self.downsamplers = nn.ModuleList([downsample])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([upsample])

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[i](x, temb)
        return self.attentions[i](x, context) if len(self.attentions) else x


class MidBlock(nn.Module):
    def __init__(self, resnets: list[ResnetBlock], attention: SpatialTransformer):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class AneUNet(nn.Module):
    """forward(sample (B, in, h, w), timestep (B,), encoder_hidden_states (B, C, 1, 77)) -> (B, out, h, w)."""

    def __init__(self, config: Mapping[str, Any], attention: AttentionImpl | str = AttentionImpl.SPLIT_EINSUM,
                 query_chunk_size: int = DEFAULT_QUERY_CHUNK):
        super().__init__()
        spec = self.spec = UNetSpec.from_config(config)
        self.attention_impl = impl = AttentionImpl(attention)
        ch, n = spec.block_out_channels, len(spec.block_out_channels)
        temb_dim = spec.time_embed_dim

        def resnet(cin: int, cout: int, scale: float = 1.0) -> ResnetBlock:
            return ResnetBlock(cin, cout, temb_dim, spec.groups, spec.eps, scale)

        def transformer(c: int, i: int) -> SpatialTransformer:
            return SpatialTransformer(c, spec.heads[i], spec.cross_attention_dim[i], spec.groups,
                                      spec.transformer_layers[i], impl, query_chunk_size)

        self.conv_in = nn.Conv2d(spec.in_channels, ch[0], spec.conv_in_kernel,
                                 padding=(spec.conv_in_kernel - 1) // 2)
        self.time_proj = SinusoidalTimesteps(ch[0], spec.flip_sin_to_cos, spec.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(spec.down_block_types):
            cin, cout = ch[max(i - 1, 0)], ch[i]
            layers = spec.layers_per_block[i]
            self.down_blocks.append(UNetBlock(
                [resnet(cin if j == 0 else cout, cout) for j in range(layers)],
                [transformer(cout, i) for _ in range(layers)] if kind == CROSS_DOWN else [],
                downsample=Downsample(cout, spec.downsample_padding) if i < n - 1 else None,
            ))

        self.mid_block = MidBlock([resnet(ch[-1], ch[-1], spec.mid_block_scale_factor) for _ in range(2)],
                                  transformer(ch[-1], n - 1))

        # Up blocks mirror the down path; per-block settings are read reversed, as diffusers does.
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        for i, kind in enumerate(spec.up_block_types):
            j_rev = n - 1 - i
            prev, cout, skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)]
            layers = spec.layers_per_block[j_rev] + 1
            resnets = [
                resnet((prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout), cout)
                for j in range(layers)
            ]
            self.up_blocks.append(UNetBlock(
                resnets,
                [transformer(cout, j_rev) for _ in range(layers)] if kind == CROSS_UP else [],
                upsample=Upsample(cout) if i < n - 1 else None,
            ))

        self.conv_norm_out = nn.GroupNorm(spec.groups, ch[0], eps=spec.eps)
        self.conv_out = nn.Conv2d(ch[0], spec.out_channels, spec.conv_out_kernel,
                                  padding=(spec.conv_out_kernel - 1) // 2)

    @classmethod
    def from_diffusers(cls, unet: nn.Module, attention: AttentionImpl | str = AttentionImpl.SPLIT_EINSUM,
                       query_chunk_size: int = DEFAULT_QUERY_CHUNK, dtype: torch.dtype = torch.float32) -> AneUNet:
        """Same architecture as `unet` (a diffusers UNet2DConditionModel), with a copy of its weights in
        `dtype`, in eval mode. fp32 (the default) is the form to evaluate: fp16 cannot resolve the
        timestep sinusoid sin(t * f) for t near 1000. fp16 is for the converter's fp16 export route,
        which only traces the module."""
        # Built on the meta device and given the source's weights: no random init, and no fp32 copy of
        # a 1.7 GB fp16 UNet on the way to an fp16 module.
        with torch.device("meta"):
            model = cls(unet.config, attention=attention, query_chunk_size=query_chunk_size)
        state = {k: v.to(dtype, copy=True) for k, v in convert_diffusers_state_dict(unet.state_dict()).items()}
        model.load_state_dict(state, strict=True, assign=True)
        for module in model.modules():
            if isinstance(module, SinusoidalTimesteps):  # non-persistent: not in any state dict
                module.freqs = module.frequencies().to(dtype)
        return model.eval()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.spec.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.time_embedding(self.time_proj(timestep))
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                x = block.layer(i, x, temb, context)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)

        x = self.mid_block(x, temb, context)

        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                x = torch.cat([x, skips.pop()], dim=1)
                x = block.layer(i, x, temb, context)
            if hasattr(block, "upsamplers"):
                # Upsample to the next skip's size so odd latent sizes match diffusers' upsample_size path.
                x = block.upsamplers[0](x, tuple(skips[-1].shape[2:]))

        return self.conv_out(F.silu(self.conv_norm_out(x)))
