"""ΔW for each LoRA format, computed in float32.

Formulas follow what trainers (kohya sd-scripts, LyCORIS) compute in their forward pass, so a merged
model reproduces A1111's unmerged ("functional") output. Shapes are checked before any arithmetic so a
mismatch becomes a LoraError, not a torch broadcasting error.
"""

from __future__ import annotations

import math

import torch

from mlsd.errors import LoraError
from mlsd.lora.formats import LOHA, LOKR, LoraModule

Shape = tuple[int, ...]


def rank(m: LoraModule) -> int | None:
    """The dimension alpha is divided by; None where the format has no rank (LoKr with full factors)."""
    t = m.tensors
    if m.format == LOHA:
        return t["hada_w1_b"].shape[0]
    if m.format == LOKR:
        for k in ("lokr_w2_b", "lokr_w1_b"):  # A1111 and LyCORIS take w2's rank when both are decomposed
            if k in t:
                return t[k].shape[0]
        return None
    return t["down"].shape[0]


def scale(m: LoraModule) -> float:
    r = rank(m)
    return m.alpha / r if m.alpha is not None and r else 1.0


def natural_shape(m: LoraModule) -> Shape:
    """The shape ΔW comes out in before it is fitted to the target; checks the factors agree."""
    t = {k: tuple(v.shape) for k, v in m.tensors.items()}
    if m.format == LOHA:
        s1 = _pair_shape(t, "hada_w1_a", "hada_w1_b", "hada_t1", m)
        s2 = _pair_shape(t, "hada_w2_a", "hada_w2_b", "hada_t2", m)
        _require(s1 == s2, m, f"its two Hadamard factors differ ({s1} vs {s2})")
        return s1
    if m.format == LOKR:
        w1 = t["lokr_w1"] if "lokr_w1" in t else _pair_shape(t, "lokr_w1_a", "lokr_w1_b", None, m)
        w2 = t["lokr_w2"] if "lokr_w2" in t else _pair_shape(t, "lokr_w2_a", "lokr_w2_b", "lokr_t2", m)
        _require(len(w1) == 2, m, f"lokr_w1 must be a matrix, got shape {w1}")
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    up, down = t["up"], t["down"]
    _require(len(up) in (2, 4) and all(d == 1 for d in up[2:]), m, f"lora_up must be linear or 1x1, got {up}")
    _require(len(up) == len(down), m, f"lora_up {up} and lora_down {down} differ in kind")
    if "mid" in t:
        mid = t["mid"]
        _require(len(mid) == 4 and mid[:2] == (up[1], down[0]) and all(d == 1 for d in down[2:]), m,
                 f"lora_mid {mid} does not join lora_up {up} and lora_down {down}")
        return (up[0], down[1], *mid[2:])
    _require(up[1] == down[0], m, f"lora_up {up} and lora_down {down} have different ranks")
    return (up[0], down[1], *down[2:])


def fits(shape: Shape, target: Shape) -> bool:
    """Same output width and same element count: covers 1x1 conv <-> linear and flattened conv kernels."""
    return shape[0] == target[0] and math.prod(shape) == math.prod(target)


def delta_weight(m: LoraModule, target_shape: Shape) -> torch.Tensor:
    """ΔW (float32, shaped like the target weight), including the module's own alpha/rank scale."""
    target_shape = tuple(target_shape)
    shape = natural_shape(m)
    if not fits(shape, target_shape):
        raise LoraError(f"LoRA module {m.key} gives a {shape} update but the model's weight is {target_shape}")
    t = {k: v.float() for k, v in m.tensors.items()}
    if m.format == LOHA:
        w = _pair(t, "hada_w1_a", "hada_w1_b", "hada_t1") * _pair(t, "hada_w2_a", "hada_w2_b", "hada_t2")
    elif m.format == LOKR:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else _pair(t, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if len(target_shape) == 4 and w2.dim() == 2:  # conv factor stored flat: (out, in*k*k)
            w2 = w2.reshape(w2.shape[0], -1, *target_shape[2:])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        w = torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs: einsum output may not allow it
    elif "mid" in t:
        # Tucker LoCon: 1x1 down, k×k mid, 1x1 up, so the kernel is a contraction over both ranks.
        w = torch.einsum("nmkl,in,mj->ijkl", t["mid"], t["up"].flatten(1), t["down"].flatten(1))
    else:
        # up is 1x1, so a k×k down composed with it is a per-tap matrix product: flatten, multiply, reshape.
        w = t["up"].flatten(1) @ t["down"].flatten(1)
    return (w * scale(m)).reshape(target_shape)


def _pair(t: dict[str, torch.Tensor], a: str, b: str, core: str) -> torch.Tensor:
    if core in t:
        # LyCORIS Tucker layout: a is (rank, out), b is (rank, in), core is (rank, rank, k, k).
        return torch.einsum("ijkl,jr,ip->prkl", t[core], t[b], t[a])
    return t[a] @ t[b].flatten(1)


def _pair_shape(t: dict[str, Shape], a: str, b: str, core: str | None, m: LoraModule) -> Shape:
    sa, sb = t[a], t[b]
    if core and core in t:
        sc = t[core]
        _require(len(sc) == 4 and len(sa) == len(sb) == 2 and sc[:2] == (sa[0], sb[0]), m,
                 f"{core} {sc} does not join {a} {sa} and {b} {sb}")
        return (sa[1], sb[1], *sc[2:])
    _require(len(sa) == 2 and sa[1] == sb[0], m, f"{a} {sa} and {b} {sb} have different ranks")
    return (sa[0], math.prod(sb[1:]))


def _require(ok: bool, m: LoraModule, why: str) -> None:
    if not ok:
        raise LoraError(f"LoRA module {m.key} is malformed: {why}")
