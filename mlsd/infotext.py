"""A1111 generation parameters ("infotext"): write, parse and read from images.

The text format matches AUTOMATIC1111's ``create_infotext`` and ``parse_generation_parameters``
so images made by mlsd paste into A1111 (and Civitai) and theirs load here. Deviations are marked
"Deviation:" where they happen. The hashes that go into the text live in :mod:`mlsd.hashes`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from mlsd.errors import InputFileError

# A1111's create_infotext order; extras follow, hashes of extra networks after them, Version last.
PARAM_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
    "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
    "Seed resize from", "Denoising strength", "Clip skip", "ENSD", "Token merging ratio", "RNG", "Tiling",
)  # fmt: skip
_TAIL_ORDER = ("Lora hashes", "TI hashes", "Version", "User")
SCHEDULE_TYPES = (
    "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
    "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)  # fmt: skip

_PARAM_RE = re.compile(
    r"""
    \s* (\w[\w \-/]+) : \s*     # key: a word character, then words, spaces, dashes, slashes
    ( "(?:\\.|[^\\"])+"         # a JSON-quoted value (may hold commas)
    | [^,]* )                   # or everything up to the next comma
    (?:,|$)
    """,
    re.X,
)
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def quote(value: Any) -> str:
    """A1111's rule: JSON-quote only values holding ',', ':' or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _fmt(value: Any) -> str:
    # A1111's UI hands integral floats over as ints ("CFG scale: 7"); match that look.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Prompt, optional ``Negative prompt:`` line, then the ``key: value`` line in A1111's order."""
    items = {k: v for k, v in params.items() if v is not None}
    if items.get("Tiling") is False:
        del items["Tiling"]
    try:
        if "Clip skip" in items and int(items["Clip skip"]) <= 1:
            del items["Clip skip"]  # A1111 writes it only when it differs from the default 1
    except (TypeError, ValueError):
        pass
    keys = [k for k in PARAM_ORDER if k in items]
    keys += [k for k in items if k not in PARAM_ORDER and k not in _TAIL_ORDER]
    keys += [k for k in _TAIL_ORDER if k in items]
    parts = []
    for k in keys:
        v = _fmt(items[k])
        parts.append(k if k == v else f"{k}: {quote(v)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


def lora_hashes_field(hashes: Mapping[str, str]) -> str:
    """``name: hash, name2: hash2``; names lose ':' and ',' so the field parses back."""
    return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in hashes.items())


def parse_lora_hashes(value: str) -> dict[str, str]:
    out = {}
    for item in value.split(","):
        name, sep, digest = item.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = digest.strip()
    return out


def parse_infotext(text: str) -> dict[str, str]:
    """Parse A1111 infotext into {"Prompt", "Negative prompt", field: value}; values stay strings.

    ``NxM`` values become ``<key>-1``/``<key>-2``. Deviation: A1111's UI-paste defaults
    (``Clip skip: 1``, ``RNG: GPU``...) are not filled in; only what the text says is returned.
    """
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        # Joined the way A1111 does: blank lines before any text are dropped.
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    res = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _PARAM_RE.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = str(json.loads(value))
            except ValueError:
                pass
        m = _SIZE_RE.match(value)
        if m:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        else:
            res[key] = value
    return res


def normalize_sampler(fields: Mapping[str, str]) -> str:
    """mlsd's combined sampler name from either A1111 form.

    ``Sampler: DPM++ 2M Karras`` (before 1.9) and ``Sampler: DPM++ 2M, Schedule type: Karras``
    both give "DPM++ 2M Karras"; an ``Automatic`` or missing schedule type gives the plain name.
    """
    sampler = str(fields.get("Sampler", "")).strip()
    schedule = str(fields.get("Schedule type", "")).strip()
    if not schedule or schedule.lower() == "automatic" or sampler.lower().endswith(" " + schedule.lower()):
        return sampler
    return f"{sampler} {schedule}".strip()


def _split_sampler(name: str) -> tuple[str, str | None]:
    for label in SCHEDULE_TYPES:
        if name.endswith(" " + label) and len(name) > len(label) + 1:
            return name[: -len(label) - 1], label
    return name, None


def _to_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        return int(float(s))


# (infotext key, attribute, converter) for the plain one-to-one fields
_SIMPLE = (
    ("Steps", "steps", _to_int), ("CFG scale", "cfg_scale", float), ("Seed", "seed", _to_int),
    ("Model hash", "model_hash", str), ("Model", "model_name", str), ("VAE hash", "vae_hash", str),
    ("VAE", "vae_name", str), ("Denoising strength", "denoising_strength", float),
    ("Clip skip", "clip_skip", _to_int), ("Version", "version", str),
)  # fmt: skip


@dataclass
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None  # mlsd's combined name, e.g. "DPM++ 2M Karras"
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_hash: str | None = None
    model_name: str | None = None
    vae_hash: str | None = None
    vae_name: str | None = None
    denoising_strength: float | None = None
    clip_skip: int = 1
    lora_hashes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # read back as strings
    version: str | None = None

    def to_infotext(self, *, split_sampler: bool = False) -> str:
        """Deviation: by default the sampler is written in the combined pre-1.9 form, which every
        A1111 version (and Civitai) reads correctly; ``split_sampler`` writes the 1.9+ form."""
        params: dict[str, Any] = dict(self.extra)
        params.update({key: getattr(self, attr) for key, attr, _ in _SIMPLE})
        params["Sampler"] = self.sampler
        if split_sampler and self.sampler:
            params["Sampler"], params["Schedule type"] = _split_sampler(self.sampler)
        if self.width and self.height:
            params["Size"] = f"{self.width}x{self.height}"
        params["Lora hashes"] = lora_hashes_field(self.lora_hashes) or None
        return format_infotext(self.prompt, self.negative_prompt, params)

    @classmethod
    def from_infotext(cls, text: str) -> GenerationParams:
        found = parse_infotext(text)
        kwargs: dict[str, Any] = {
            "prompt": found.pop("Prompt"),
            "negative_prompt": found.pop("Negative prompt"),
        }
        kwargs["sampler"] = normalize_sampler(found) or None
        found.pop("Sampler", None)
        found.pop("Schedule type", None)
        for key, attr, conv in _SIMPLE:
            if key in found:
                try:
                    kwargs[attr] = conv(found[key])
                    del found[key]
                except ValueError:
                    pass  # an unreadable value stays in ``extra`` rather than failing the whole read
        if "Size-1" in found:
            kwargs["width"], kwargs["height"] = int(found.pop("Size-1")), int(found.pop("Size-2"))
        if "Lora hashes" in found:
            kwargs["lora_hashes"] = parse_lora_hashes(found.pop("Lora hashes"))
        kwargs["extra"] = found
        return cls(**kwargs)


# ---- images -------------------------------------------------------------------------------------


@dataclass
class ImageParameters:
    source: Literal["a1111", "comfyui", "none"]
    raw: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # parse_infotext's keys ("Prompt", ...)
    note: str = ""


def png_pnginfo(text: str, existing: Mapping[str, str] | None = None) -> PngInfo:
    """PngInfo with ``parameters`` as A1111 writes it: tEXt when Latin-1 fits, else iTXt."""
    info = PngInfo()
    for key, value in {**(existing or {}), "parameters": text}.items():
        info.add_text(key, str(value))
    return info


def exif_with_parameters(text: str) -> Image.Exif:
    """EXIF for JPEG/WebP carrying ``text`` in UserComment, UTF-16BE like A1111 (via piexif)."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif


def decode_user_comment(data: bytes | str) -> str:
    """Decode an EXIF UserComment: 8-byte charset prefix, then the text."""
    if isinstance(data, str):
        return data
    prefix, body = data[:8], data[8:]
    if prefix == b"UNICODE\0":
        if 0 not in body:
            try:  # some tools label UTF-8 text as UNICODE; real UTF-16 prompts hold ASCII, hence zeros
                return body.decode("utf-8")
            except UnicodeDecodeError:
                pass
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            encoding, body = ("utf-16-be" if body[0] == 0xFE else "utf-16-le"), body[2:]
        else:
            # No BOM: A1111 (piexif) writes big-endian, others little-endian. ASCII characters put
            # their zero byte first in BE and second in LE.
            encoding = "utf-16-le" if body[1::2].count(0) > body[0::2].count(0) else "utf-16-be"
        return body[: len(body) // 2 * 2].decode(encoding, "replace").rstrip("\0")
    if prefix in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", "replace").rstrip("\0")
    return data.decode("utf-8", "replace").rstrip("\0")


def _comfy_fields(info: Mapping[str, Any]) -> dict[str, str]:
    """Prompt text from a ComfyUI API graph (``prompt`` chunk) when it is simple enough to tell."""
    try:
        graph = json.loads(info.get("prompt") or "null")
    except (TypeError, ValueError):
        graph = None
    if isinstance(graph, dict):
        nodes = {
            str(k): n for k, n in graph.items() if isinstance(n, dict) and isinstance(n.get("inputs"), dict)
        }

        def text_of(link: Any) -> str | None:
            node = nodes.get(str(link[0])) if isinstance(link, list) and link else None
            if node and str(node.get("class_type", "")).startswith("CLIPTextEncode"):
                text = node["inputs"].get("text")
                return text if isinstance(text, str) else None
            return None

        samplers = [n["inputs"] for n in nodes.values() if "positive" in n["inputs"]]
        if len(samplers) == 1 and (positive := text_of(samplers[0]["positive"])) is not None:
            out = {"Prompt": positive, "Negative prompt": text_of(samplers[0].get("negative")) or ""}
            for key, name in (
                ("seed", "Seed"),
                ("noise_seed", "Seed"),
                ("steps", "Steps"),
                ("cfg", "CFG scale"),
            ):
                value = samplers[0].get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    out[name] = str(value)
            return out
        # Without a sampler to say which is which, a lone text encoder can only be the prompt.
        texts = [t for k in nodes if (t := text_of([k])) is not None]
        if not samplers and len(texts) == 1:
            return {"Prompt": texts[0], "Negative prompt": ""}
    # A UI-only ``workflow`` chunk needs ComfyUI's node semantics to follow; it is only recognised.
    return {}


def read_image_parameters(path: str | os.PathLike) -> ImageParameters:
    """Generation parameters of a PNG, JPEG or WebP: A1111 text, a ComfyUI graph, or nothing."""
    try:
        with Image.open(path) as im:
            info = dict(im.info)
            try:
                comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            except Exception:  # a broken EXIF block should not hide PNG text chunks
                comment = None
    except FileNotFoundError:
        raise InputFileError("Image file not found.", where=path, fix="check the path") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputFileError(f"Cannot read the image: {e}", where=path,
                             fix="use a PNG, JPEG or WebP file") from None  # fmt: skip
    text = info.get("parameters")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not (isinstance(text, str) and text.strip()) and comment is not None:
        text = decode_user_comment(comment)
    if isinstance(text, str) and text.strip():
        return ImageParameters("a1111", text, parse_infotext(text))
    if "prompt" in info or "workflow" in info:
        found = _comfy_fields(info)
        raw = str(info.get("prompt") or info.get("workflow") or "")
        note = "ComfyUI workflow" + ("" if found else "; its prompt could not be told apart in the graph")
        return ImageParameters("comfyui", raw, found, note)
    return ImageParameters("none", note="no generation parameters in this image")
