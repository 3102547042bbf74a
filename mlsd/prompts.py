"""AUTOMATIC1111 prompt syntax: attention weights, BREAK, extra-network tags and 75-token chunks.

The rules follow A1111's ``modules/prompt_parser.py`` (attention), ``modules/extra_networks.py``
(``<kind:args>`` tags) and ``modules/sd_hijack_clip.py`` (chunking, "Original" emphasis), so a
prompt copied from an A1111 image conditions the model the same way. Deviations are marked
"Deviation:" where they happen.

Not supported here (the text goes to CLIP as typed): prompt editing ``[a:b:0.5]``, alternation
``[a|b]``, composable ``AND``, textual-inversion embeddings and comment lines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mlsd.errors import UsageError

CHUNK_LEN = 75  # usable tokens per chunk; BOS and EOS make 77 when encoded
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack
BOS_ID = 49406
EOS_ID = 49407
BREAK = ("BREAK", -1.0)  # how parse_prompt_attention reports BREAK, as A1111 does
ROUND_MULT = 1.1
SQUARE_MULT = 1 / 1.1  # A1111 multiplies by this constant; dividing by 1.1 rounds differently
_MAX_WEIGHT = 1e3  # keeps absurd nesting or huge explicit weights finite
_MIN_WEIGHT = 1e-6  # keeps deep [[[...]]] from underflowing to a zero weight

_ATTENTION_RE = re.compile(
    r"""
    \\[()\[\]\\]        # escaped bracket or backslash
  | \\                  # any other backslash
  | [(\[]
  | :([+-]?[.\d]+)\)    # explicit weight closing a round bracket
  | [)\]]
  | [^\\()\[\]:]+
  | :
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NET_RE = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")  # A1111 registers "lyco" as an alias of "lora"


@dataclass(frozen=True)
class LoraTag:
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


@dataclass(frozen=True)
class ExtraNetworkTag:
    """Any ``<kind:arg1:arg2...>`` tag; A1111 removes every one of them from the text, known or not."""

    kind: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Chunk:
    """75 token ids (padded with the pad id) and their weights; ``length`` counts the real tokens."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    length: int


def _clamp(w: float) -> float:
    if w == 0:
        return 0.0
    return math.copysign(min(max(abs(w), _MIN_WEIGHT), _MAX_WEIGHT), w)


def _parse(text: str) -> list[list]:
    """Segments as [text, weight, is_break]."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, mult: float) -> None:
        # Deviation: A1111 also scales its BREAK marker, which turns "(a BREAK b)" into a literal
        # word BREAK with weight -1.1; markers stay markers here.
        for seg in res[start:]:
            if not seg[2]:
                seg[1] = _clamp(seg[1] * mult)

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK_RE.split(chunk)):
            if i:
                res.append([BREAK[0], BREAK[1], True])
            res.append([part, 1.0, False])

    for m in _ATTENTION_RE.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok[0] == "\\":
            res.append([tok[1:], 1.0, False])  # a lone backslash vanishes, as in A1111
        elif tok in ("(", "["):
            (round_open if tok == "(" else square_open).append(len(res))
        elif weight is not None and round_open:
            start = round_open.pop()
            try:
                mult = float(weight)
            except ValueError:
                # Deviation: A1111 crashes on "(a:.)"; keep ":." as text and close the bracket normally.
                add_text(tok[:-1])
                mult = ROUND_MULT
            scale(start, mult)
        elif tok == ")" and round_open:
            scale(round_open.pop(), ROUND_MULT)
        elif tok == "]" and square_open:
            scale(square_open.pop(), SQUARE_MULT)
        else:
            add_text(tok)
    for pos in round_open:
        scale(pos, ROUND_MULT)
    for pos in square_open:
        scale(pos, SQUARE_MULT)
    if not res:
        res = [["", 1.0, False]]
    merged = [res[0]]
    for seg in res[1:]:
        last = merged[-1]
        if not seg[2] and not last[2] and seg[1] == last[1]:
            last[0] += seg[0]
        else:
            merged.append(seg)
    return merged


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (text, weight) runs; each BREAK appears as the ``BREAK`` tuple.

    Weights are 1.1 per ``(``, 1/1.1 per ``[``, or explicit ``(text:w)``; nesting multiplies;
    unclosed brackets apply to the rest; adjacent runs of equal weight are merged.
    """
    return [BREAK if brk else (t, w) for t, w, brk in _parse(text)]


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every ``<kind:args>`` tag (LoRA, hypernet, ...) and return them in order."""
    tags: list[ExtraNetworkTag] = []

    def found(m: re.Match) -> str:
        tags.append(ExtraNetworkTag(m.group(1), tuple(m.group(2).split(":"))))
        return ""

    return _EXTRA_NET_RE.sub(found, prompt), tags


def _lora_from_tag(tag: ExtraNetworkTag) -> LoraTag:
    positional, named = [], {}
    for item in tag.args:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    where = f"<{tag.kind}:{':'.join(tag.args)}>"
    if not positional or not positional[0].strip():
        raise UsageError("A LoRA tag has no name.", where=where, fix="write it as <lora:name:weight>")
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        raise UsageError(
            "A LoRA weight is not a number.", where=where, fix="use <lora:name:0.8> or <lora:name:te:unet>"
        ) from None
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise UsageError("A LoRA weight is not finite.", where=where, fix="use a weight such as 0.8")
    # Deviation: A1111 keeps spaces around the name; nobody means them.
    return LoraTag(positional[0].strip(), te, unet)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove all extra-network tags; parse ``<lora:name[:te[:unet]]>`` (and ``<lyco:...>``).

    One weight sets both; none means 1.0; ``te=``/``unet=`` named forms are accepted as in A1111.
    Other kinds (``<hypernet:...>``) are dropped from the text but not returned: mlsd does not run
    them. Use :func:`extract_extra_networks` to see them.
    """
    clean, tags = extract_extra_networks(prompt)
    return clean, [_lora_from_tag(t) for t in tags if t.kind in _LORA_KINDS]


def _pad_id(tokenizer, pad_id: int | None) -> int:
    if pad_id is not None:
        return pad_id
    tok_pad = getattr(tokenizer, "pad_token_id", None)
    return EOS_ID if tok_pad is None else int(tok_pad)


def _chunk(prompt: str, tokenizer, pad_id: int, comma_backtrack: int) -> tuple[list[Chunk], int]:
    clean, _ = extract_extra_networks(prompt)
    segments = _parse(clean)
    texts = [t for t, _, brk in segments if not brk]
    # verbose=False: the "longer than 77 tokens" warning is moot, chunking handles any length.
    encoded = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
    comma_id = tokenizer.convert_tokens_to_ids(",</w>")
    if comma_id == getattr(tokenizer, "unk_token_id", None):
        comma_id = None

    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    count = 0

    def flush(final: bool = False) -> None:
        nonlocal ids, weights, last_comma, count
        # A1111's counter: a chunk ended early (BREAK, comma backtrack) still counts as 75.
        count += len(ids) if final else CHUNK_LEN
        n = CHUNK_LEN - len(ids)
        chunks.append(Chunk(tuple(ids + [pad_id] * n), tuple(weights + [1.0] * n), len(ids)))
        ids, weights, last_comma = [], [], -1

    for _text, weight, brk in segments:
        if brk:
            flush()
            continue
        for tok in next(encoded):
            if tok == comma_id:
                last_comma = len(ids)
            elif (
                comma_backtrack
                and len(ids) == CHUNK_LEN
                and last_comma != -1
                and CHUNK_LEN - last_comma <= comma_backtrack
            ):
                # Move the words after the last comma to the next chunk instead of splitting them.
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                flush()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_LEN:
                flush()
            ids.append(tok)
            weights.append(weight)
    if ids or not chunks:
        flush(final=True)
    return chunks, count


def tokenize_weighted(
    prompt: str, tokenizer, *, pad_id: int | None = None, comma_backtrack: int = COMMA_BACKTRACK
) -> list[Chunk]:
    """Tokenize an A1111 prompt into 75-token chunks with per-token weights.

    Extra-network tags are removed first (A1111 never lets them reach CLIP). ``pad_id`` defaults
    to ``tokenizer.pad_token_id``: 49407 for SD1, 0 (``!``) for SD2's tokenizer config.
    """
    return _chunk(prompt, tokenizer, _pad_id(tokenizer, pad_id), comma_backtrack)[0]


def count_tokens(prompt: str, tokenizer, *, comma_backtrack: int = COMMA_BACKTRACK) -> tuple[int, int]:
    """(tokens used, current capacity) for a "12/75"-style counter, as A1111's UI shows it."""
    _, count = _chunk(prompt, tokenizer, EOS_ID, comma_backtrack)
    return count, math.ceil(max(count, 1) / CHUNK_LEN) * CHUNK_LEN


def empty_chunk(pad_id: int) -> Chunk:
    return Chunk((pad_id,) * CHUNK_LEN, (1.0,) * CHUNK_LEN, 0)


def chunks_to_tensors(
    chunks: list[Chunk], *, bos_id: int = BOS_ID, eos_id: int = EOS_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 77) int64 ids and (n, 77) float32 weights: BOS, tokens, EOS, then the chunk's padding.

    With SD2's pad id 0 this gives A1111's layout (EOS right after the text, zeros after it).
    """
    ids, weights = [], []
    for c in chunks:
        ids.append([bos_id, *c.ids[: c.length], eos_id, *c.ids[c.length :]])
        weights.append([1.0, *c.weights[: c.length], 1.0, *c.weights[c.length :]])
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def equalize_chunk_counts(
    cond: list[Chunk], uncond: list[Chunk], *, pad_id: int
) -> tuple[list[Chunk], list[Chunk]]:
    """Pad the shorter list with empty-prompt chunks so cond and uncond batch together."""
    n = max(len(cond), len(uncond))
    pad = empty_chunk(pad_id)
    return cond + [pad] * (n - len(cond)), uncond + [pad] * (n - len(uncond))


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis: scale each token's vector, then restore each chunk's mean.

    ``hidden`` is (n, 77, C), ``weights`` (n, 77). A1111 takes the mean over the whole
    (batch, 77, C) tensor of one chunk position; for one prompt that is the per-chunk mean.
    """
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    z = hidden * weights.to(hidden.dtype).unsqueeze(-1)
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    # Deviation: A1111 divides by zero (NaN output) when every weight is 0; leave such chunks unscaled.
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return z * ratio
