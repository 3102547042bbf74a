"""Transformer blocks on the (B, C, 1, S) layout, with three interchangeable attention kernels.

q, k and v always arrive as (B, heads * head_dim, 1, S) tensors straight out of 1x1 convolutions.
The kernels differ only in how they spread the work over ops, which matters to the ANE compiler:
one batched multi-head product is fine on a GPU, while the ANE prefers many small per-head products
that never need a 5D reshape, and bounded attention matrices when the latent is large.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from converters.coreml.ane.layers import ChannelLayerNorm, conv1x1

DEFAULT_QUERY_CHUNK = 512


class AttentionImpl(StrEnum):
    ORIGINAL = "original"
    SPLIT_EINSUM = "split_einsum"
    SPLIT_EINSUM_V2 = "split_einsum_v2"


def attention_original(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, inner, _, sq = q.shape
    d = inner // heads
    qh = q.reshape(b, heads, d, sq)
    kh = k.reshape(b, heads, d, k.shape[3])
    vh = v.reshape(b, heads, d, v.shape[3])
    weights = torch.einsum("bhdq,bhdk->bhqk", qh, kh) * d**-0.5
    weights = weights.softmax(dim=3)
    out = torch.einsum("bhqk,bhdk->bhdq", weights, vh)
    return out.reshape(b, inner, 1, sq)


def _head_products(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One head, one block of queries: q (B, d, 1, Q), k_t (B, K, 1, d), v (B, d, 1, K) -> (B, d, 1, Q).

    Keys sit on dim 1 of the score tensor, so the softmax reduces over channels, the ANE's native axis.
    """
    scores = torch.einsum("bdxq,bkxd->bkxq", q, k_t) * scale
    return torch.einsum("bkxq,bdxk->bdxq", scores.softmax(dim=1), v)


def attention_split_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           query_chunk: int | None = None) -> torch.Tensor:
    """Per-head attention; with query_chunk, the queries of each head are also processed in blocks.

    Everything is sliced with Python ints taken from static shapes, so the graph is a fixed fan-out
    of small einsums (heads x chunks of them) with no reshape to 5D and no data-dependent control flow.
    """
    d = q.shape[1] // heads
    sq = q.shape[3]
    scale = d**-0.5
    k_t = k.transpose(1, 3)  # (B, K, 1, C) once, then sliced per head along the last axis
    step = sq if query_chunk is None else max(1, min(query_chunk, sq))
    outputs = []
    for h in range(heads):
        qh = q[:, h * d:(h + 1) * d]
        kh = k_t[:, :, :, h * d:(h + 1) * d]
        vh = v[:, h * d:(h + 1) * d]
        if step >= sq:
            outputs.append(_head_products(qh, kh, vh, scale))
            continue
        blocks = [_head_products(qh[:, :, :, s:s + step], kh, vh, scale) for s in range(0, sq, step)]
        outputs.append(torch.cat(blocks, dim=3))
    return torch.cat(outputs, dim=1)


class Attention(nn.Module):
    """Self- or cross-attention; key/value come from `context` (B, C_ctx, 1, K) when it is given."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None,
                 impl: AttentionImpl, query_chunk: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.impl = AttentionImpl(impl)
        self.query_chunk = query_chunk
        kv_dim = query_dim if context_dim is None else context_dim
        self.to_q = conv1x1(query_dim, inner, bias=False)
        self.to_k = conv1x1(kv_dim, inner, bias=False)
        self.to_v = conv1x1(kv_dim, inner, bias=False)
        self.to_out = conv1x1(inner, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        if self.impl is AttentionImpl.ORIGINAL:
            out = attention_original(q, k, v, self.heads)
        elif self.impl is AttentionImpl.SPLIT_EINSUM:
            out = attention_split_einsum(q, k, v, self.heads)
        else:
            out = attention_split_einsum(q, k, v, self.heads, query_chunk=self.query_chunk)
        return self.to_out(out)


class GEGLUFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.geglu = conv1x1(dim, inner * 2)
        self.out = conv1x1(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.geglu(x).chunk(2, dim=1)
        return self.out(hidden * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, impl: AttentionImpl,
                 query_chunk: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, None, impl, query_chunk)
        self.norm2 = ChannelLayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, impl, query_chunk)
        self.norm3 = ChannelLayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel (continuous input), (B, C, H, W) in and out.

    A 1x1 conv equals a per-token linear, so SD1's conv proj_in and SD2's linear proj_in are the same
    module here; only the weight reshape at load time differs.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, num_layers: int,
                 impl: AttentionImpl, query_chunk: int):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = conv1x1(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, impl, query_chunk)
            for _ in range(num_layers)
        )
        self.proj_out = conv1x1(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x))
        # Row-major (h, w) flattening: the same token order as diffusers' permute+reshape.
        hidden = hidden.reshape(b, hidden.shape[1], 1, h * w)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        return self.proj_out(hidden).reshape(b, c, h, w) + x
