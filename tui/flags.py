"""mlsd's errors name the CLI's flags ("use --backend torch"); in the TUI the same advice names the form field.

The core keeps its messages for the CLI; only the text shown here is rewritten, per screen, since the
same flag can be a different field (or no field at all) on the Generate and the Convert screen.
"""

from __future__ import annotations

import re

from mlsd.errors import MlsdError

_WORD = r"[A-Za-z0-9_.:/|\\~-]+"  # a value such as torch, 2, NAME:WEIGHT, macOS15, 512x512


def _choices(*values: str) -> str:
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


# flag (or a joined "--a/--b" as the core writes them) -> (field label, pattern of a value that may follow)
GENERATE_FIELDS: dict[str, tuple[str, str | None]] = {
    "--backend": ("Backend", _choices("auto", "torch", "coreml", "coreml-reference")),
    "--compute-unit": ("Compute", _choices("auto", "ane", "gpu", "cpu", "all")),
    "--device": ("Device", _choices("auto", "cuda", "mps", "cpu")),
    "--lora": ("LoRAs", r"[A-Z]+:[A-Z]+|[\w.-]+:[\d.]+"),
    "--vae": ("VAE", None),
    "--model": ("Model", None),
    "--family": ("Family", _choices("sd1", "sd2")),
    "--prompt": ("Prompt", None),
    "--negative-prompt": ("Negative prompt", None),
    "--sampler/--schedule-type": ("Sampler", None),
    "--sampler": ("Sampler", None),
    "--steps": ("Steps", r"\d+"),
    "--cfg-scale": ("CFG scale", r"[\d.]+"),
    "--seed": ("Seed", r"-?\d+"),
    "--width/--height": ("Width/Height", None),
    "--width": ("Width", r"\d+"),
    "--height": ("Height", r"\d+"),
    "--batch-size/--batch-count": ("Batch size/Batch count", None),
    "--batch-size": ("Batch size", r"\d+"),
    "--batch-count": ("Batch count", r"\d+"),
    "--clip-skip": ("Clip skip", r"\d+"),
    "--init-image": ("Init image", None),
    "--strength": ("Strength", r"[\d.]+"),
    "--mask": ("Mask", None),
}  # fmt: skip

CONVERT_FIELDS: dict[str, tuple[str, str | None]] = {
    "--lora": ("LoRAs", r"[A-Z]+:[A-Z]+|[\w.-]+:[\d.]+"),
    "--vae": ("VAE", None),
    "--model": ("Checkpoint", None),
    "--attention": ("Attention", _choices("split_einsum", "split_einsum_v2", "original")),
    "--chunks": ("UNet chunks", r"\d+"),
    "--quantize-bits": ("Quantize", r"\w+"),
    "--sizes/--width/--height": ("Sizes", None),
    "--sizes": ("Sizes", None),
    "--width": ("Sizes", None),
    "--height": ("Sizes", None),
    "--components": ("Components", None),
    "--min-target": ("Target", r"(?:macOS|iOS)\d+"),
    "--clip-skip": ("Clip skip", r"\d+"),
}  # fmt: skip

# Commands a TUI user reaches through a screen instead.
_COMMANDS = [
    (re.compile(r"\(mlsd convert\)"), "(Convert screen, F5)"),
    (re.compile(r"`?mlsd convert`?"), "the Convert screen (F5)"),
    (re.compile(r"\(see `?mlsd models`?\)"), "(see the Models screen, F4)"),
]


def _flag_pattern(fields: dict) -> re.Pattern:
    flags = "|".join(re.escape(f) for f in sorted(fields, key=len, reverse=True))
    return re.compile(rf"(?:\b(?P<verb>use|pass|add|set)\s+)?(?P<flag>{flags})(?![\w-])(?:\s+(?P<value>{_WORD}))?")


def in_form_terms(text: str, fields: dict[str, tuple[str, str | None]]) -> str:
    """Rewrite the flags in ``text``: "use --backend torch" -> "set the Backend field to torch",
    "--chunks 9 is outside" -> "UNet chunks 9 is outside", a bare "--lora" -> "the LoRAs field"."""
    pattern = _flag_pattern(fields)

    def replace(m: re.Match) -> str:
        label, value_pattern = fields[m["flag"]]
        value = m["value"]
        tail = ""
        if value is not None and value_pattern is None and re.fullmatch(r"[A-Z|:_]+", value):
            value = None  # a placeholder such as NAME|PATH: the field's label says it
        elif value is not None and not (value_pattern and re.fullmatch(value_pattern, value)):
            tail, value = m.group(0)[m.end("flag") - m.start():], None  # a word of the sentence, not a value
        if m["verb"]:
            said = f"set the {label} field to {value}" if value else f"fill in the {label} field"
        else:
            said = f"{label} {value}" if value else f"the {label} field"
        return said + tail

    for command, replacement in _COMMANDS:
        text = command.sub(replacement, text)
    return pattern.sub(replace, text)


def render_for_form(error: MlsdError, fields: dict[str, tuple[str, str | None]]) -> str:
    """``error.render()`` with its flags named as form fields (a "where" that is only a flag: that field)."""
    lines = [in_form_terms(error.what, fields)]
    if error.where:
        where = error.where
        lines.append(f"  where: {fields[where][0] + ' field' if where in fields else in_form_terms(where, fields)}")
    if error.fix:
        lines.append(f"  fix:   {in_form_terms(error.fix, fields)}")
    text = "\n".join(lines)
    return text[0].upper() + text[1:] if text else text
