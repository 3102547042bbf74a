"""Building blocks of the ANE UNet that are not attention.

Every linear layer of the diffusers UNet is a 1x1 convolution here: the ANE runs convolutions on
channel-first 4D tensors natively, while linears on (B, S, C) tensors force layout changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv1x1(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over dim 1 of a (B, C, 1, S) tensor; equals nn.LayerNorm(C) on the (B, S, C) view.

    Written with plain reductions so the converter emits ops that stay on the ANE, instead of a
    layer_norm over a non-final axis that it would have to transpose around.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        # Biased variance, as nn.LayerNorm uses.
        var = (centered * centered).mean(dim=1, keepdim=True)
        normed = centered * torch.rsqrt(var + self.eps)
        return normed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SinusoidalTimesteps(nn.Module):
    """diffusers' positional timestep embedding, (B,) -> (B, C, 1, 1).

    The frequencies are a non-persistent buffer so the graph holds a constant instead of arange/exp,
    and they are computed exactly as diffusers does so the fp32 values agree bit for bit.
    """

    def __init__(self, channels: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000):
        super().__init__()
        if channels % 2:
            raise NotImplementedError("odd timestep embedding widths are not supported")
        self._shape = (channels // 2, freq_shift, max_period)
        self.register_buffer("freqs", self.frequencies(), persistent=False)
        self.flip_sin_to_cos = flip_sin_to_cos

    def frequencies(self) -> torch.Tensor:
        half, freq_shift, max_period = self._shape
        exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / (half - freq_shift)
        return torch.exp(exponent)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        # Dtype checks are static under export; an unconditional cast would leave a no-op node in the graph.
        if timestep.dtype != self.freqs.dtype:
            timestep = timestep.to(self.freqs.dtype)
        args = timestep[:, None] * self.freqs[None, :]
        sin, cos = torch.sin(args), torch.cos(args)
        parts = [cos, sin] if self.flip_sin_to_cos else [sin, cos]
        return torch.cat(parts, dim=1)[:, :, None, None]


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = conv1x1(in_channels, embed_dim)
        self.linear_2 = conv1x1(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with an additive time embedding, (B, C, H, W) in and out."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = conv1x1(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = conv1x1(in_channels, out_channels) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        # temb is (B, T, 1, 1): the 1x1 conv output broadcasts over H and W without a reshape.
        h = h + self.time_emb_proj(F.silu(temb))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            # diffusers pads right/bottom only in this case; mirror it so odd sizes agree.
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Shapes are static under export, so this branch is decided at trace time, not on data.
        if size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
