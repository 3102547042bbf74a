"""Tiny seeded models, LoRA factor generators and the forward-hook reference for the LoRA tests.

The reference is A1111's unmerged ("functional") mode: y = module(x) + weight · Δ(x), with Δ(x) computed
by pushing x through the factors with F.linear / F.conv2d. It never forms ΔW, so agreement with a merged
model checks mlsd.lora.math against an independent route (Hadamard and Kronecker products included).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


@pytest.fixture(scope="module", autouse=True)
def single_thread(one_thread):
    """Autouse in every module that imports it: one torch thread (see conftest's ``one_thread``)."""


UNET_LINEAR = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.resnets.1.time_emb_proj",
    "time_embedding.linear_1",
]
UNET_CONV1 = ["down_blocks.1.attentions.0.proj_in", "up_blocks.1.resnets.0.conv_shortcut"]
UNET_CONV3 = ["conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv",
              "up_blocks.0.upsamplers.0.conv", "mid_block.resnets.1.conv2", "up_blocks.1.resnets.2.conv1"]
TE_PARTIAL = ["encoder.layers.1.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj",
              "encoder.layers.3.mlp.fc1", "encoder.layers.3.mlp.fc2"]


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, blocks: int = 2) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    down = ("DownBlock2D", "CrossAttnDownBlock2D") if blocks == 2 else (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up = ("CrossAttnUpBlock2D", "UpBlock2D") if blocks == 2 else (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    return UNet2DConditionModel(
        block_out_channels=(32, 64) if blocks == 2 else (32, 64, 64, 64), layers_per_block=2, sample_size=32,
        in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_attention_dim, norm_num_groups=32, attention_head_dim=8,
    ).eval()


def tiny_text_encoder(seed: int = 0, with_projection: bool = False, hidden: int = 32) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                         vocab_size=1000, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1, projection_dim=16)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


@torch.no_grad()
def unet_out(unet: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    width = unet.config.cross_attention_dim
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, width, generator=g)
    return unet(x, torch.tensor([10, 700]), encoder_hidden_states=ctx).sample


@torch.no_grad()
def te_out(te: nn.Module, hidden: bool = False):
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    out = te(ids, output_hidden_states=hidden)
    return out.hidden_states if hidden else out.last_hidden_state


@dataclass
class Piece:
    """One module's LoRA tensors (kohya suffixes) and Δ(x), already scaled by alpha/rank."""

    tensors: dict[str, torch.Tensor]
    delta: Callable[[torch.Tensor], torch.Tensor]


def _conv(mod: nn.Module) -> Callable:
    return lambda x, w: F.conv2d(x, w, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)


def _alpha(t: dict, alpha: float | None, rank: int | None) -> float:
    if alpha is None:
        return 1.0
    t["alpha"] = torch.tensor(alpha)
    return alpha / rank if rank else 1.0


def lora_piece(mod: nn.Module, g: torch.Generator, rank: int = 4, alpha: float | None = None,
               tucker: bool = False) -> Piece:
    out_f, in_f = mod.weight.shape[:2]
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    if isinstance(mod, nn.Linear):
        down, up = r(rank, in_f), r(out_f, rank)
        t = {"lora_down.weight": down, "lora_up.weight": up}
        s = _alpha(t, alpha, rank)
        return Piece(t, lambda x: s * F.linear(F.linear(x, down), up))
    conv, k = _conv(mod), mod.kernel_size
    up = r(out_f, rank, 1, 1)
    if tucker:
        down, mid = r(rank, in_f, 1, 1), r(rank, rank, *k)
        t = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
        s = _alpha(t, alpha, rank)
        return Piece(t, lambda x: s * F.conv2d(conv(F.conv2d(x, down), mid), up))
    down = r(rank, in_f, *k)
    t = {"lora_down.weight": down, "lora_up.weight": up}
    s = _alpha(t, alpha, rank)
    return Piece(t, lambda x: s * F.conv2d(conv(x, down), up))


def loha_piece(mod: nn.Module, g: torch.Generator, rank: int = 3, alpha: float | None = None,
               tucker: bool = False) -> Piece:
    # (W1 ⊙ W2) x without forming W: row-wise Kronecker of the up factors after a face-split of the downs.
    out_f, in_f = mod.weight.shape[:2]
    k = tuple(mod.weight.shape[2:])
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    if tucker:
        a1, b1, t1, a2, b2, t2 = r(rank, out_f), r(rank, in_f), r(rank, rank, *k), r(rank, out_f), r(rank, in_f), \
            r(rank, rank, *k)
        t = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_t1": t1, "hada_w2_a": a2, "hada_w2_b": b2, "hada_t2": t2}
        B = (b1[:, None] * b2[None]).reshape(rank * rank, in_f, 1, 1)
        T = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(rank * rank, rank * rank, *k)
        A = (a1[:, None] * a2[None]).reshape(rank * rank, out_f).T[:, :, None, None]
        s, conv = _alpha(t, alpha, rank), _conv(mod)
        return Piece(t, lambda x: s * F.conv2d(conv(F.conv2d(x, B), T), A))
    flat = in_f * (k[0] * k[1] if k else 1)
    a1, b1, a2, b2 = r(out_f, rank), r(rank, flat), r(out_f, rank), r(rank, flat)
    t = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2}
    s = _alpha(t, alpha, rank)
    B = (b1[:, None] * b2[None]).reshape(rank * rank, flat)
    A = (a1[:, :, None] * a2[:, None]).reshape(out_f, rank * rank)
    if isinstance(mod, nn.Linear):
        return Piece(t, lambda x: s * F.linear(F.linear(x, B), A))
    conv = _conv(mod)
    return Piece(t, lambda x: s * F.conv2d(conv(x, B.reshape(rank * rank, in_f, *k)), A[:, :, None, None]))


def lokr_piece(mod: nn.Module, g: torch.Generator, om: int, im: int, w1_rank: int | None = None,
               w2_rank: int | None = None, tucker: bool = False, alpha: float | None = None) -> Piece:
    # kron(W1, W2) x == W1 · X · W2ᵀ with x folded to (im, in/im): the identity the reference uses.
    out_f, in_f = mod.weight.shape[:2]
    ok, inn = out_f // om, in_f // im
    k = tuple(mod.weight.shape[2:])
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    t: dict[str, torch.Tensor] = {}
    if w1_rank:
        t["lokr_w1_a"], t["lokr_w1_b"] = r(om, w1_rank), r(w1_rank, im)
        w1 = lambda z: F.linear(F.linear(z, t["lokr_w1_b"]), t["lokr_w1_a"])  # noqa: E731
    else:
        t["lokr_w1"] = r(om, im)
        w1 = lambda z: F.linear(z, t["lokr_w1"])  # noqa: E731
    conv = _conv(mod) if k else None
    if not w2_rank:
        t["lokr_w2"] = r(ok, inn, *k)
        w2 = (lambda z: conv(z, t["lokr_w2"])) if k else (lambda z: F.linear(z, t["lokr_w2"]))
    elif tucker:
        a, b, c = r(w2_rank, ok), r(w2_rank, inn), r(w2_rank, w2_rank, *k)
        t.update(lokr_w2_a=a, lokr_w2_b=b, lokr_t2=c)
        w2 = lambda z: F.conv2d(conv(F.conv2d(z, b[:, :, None, None]), c), a.T[:, :, None, None])  # noqa: E731
    else:
        a, b = r(ok, w2_rank), r(w2_rank, inn * (k[0] * k[1] if k else 1))
        t.update(lokr_w2_a=a, lokr_w2_b=b)
        w2 = (lambda z: F.conv2d(conv(z, b.reshape(w2_rank, inn, *k)), a[:, :, None, None])) if k else (
            lambda z: F.linear(F.linear(z, b), a))
    s = _alpha(t, alpha, w2_rank or w1_rank)

    def delta(x: torch.Tensor) -> torch.Tensor:
        if not k:
            z = w2(x.reshape(*x.shape[:-1], im, inn)).transpose(-1, -2)  # (..., ok, im)
            return s * w1(z).transpose(-1, -2).reshape(*x.shape[:-1], om * ok)
        n, _, h, w = x.shape
        z = w2(x.reshape(n * im, inn, h, w))
        z = w1(z.reshape(n, im, ok, *z.shape[2:]).movedim(1, -1)).movedim(-1, 1)
        return s * z.reshape(n, om * ok, *z.shape[3:])

    return Piece(t, delta)


def kohya_stem(prefix: str, name: str) -> str:
    return prefix + name.replace(".", "_")


def write_lora(path: Path, entries: dict[str, Piece | dict[str, torch.Tensor]],
               metadata: dict[str, str] | None = None) -> Path:
    """entries: stem -> Piece (or raw suffix -> tensor dict); keys are ``stem + '.' + suffix``."""
    tensors = {}
    for stem, p in entries.items():
        for suffix, t in (p.tensors if isinstance(p, Piece) else p).items():
            tensors[f"{stem}.{suffix}"] = t.clone().contiguous()  # safetensors refuses shared storage
    save_file(tensors, str(path), metadata=metadata)
    return path


@contextmanager
def hooked(model: nn.Module, deltas: list[tuple[str, Callable, float]]):
    """Add weight · Δ(input) to each named module's output for the duration of the block."""
    handles = []
    for name, fn, w in deltas:
        hook = lambda m, args, out, fn=fn, w=w: out + w * fn(args[0])  # noqa: E731
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
