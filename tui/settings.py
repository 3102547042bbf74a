"""What the TUI remembers between runs: the last form values and folders, in mlsd's settings.toml.

The file is shared with the CLI (which reads ``models_dir`` from it), so every key the TUI does not
own is written back unchanged, and the TUI's own state lives under ``[tui]``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import secrets
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mlsd.pipeline.samplers import DEFAULT_SAMPLER


@dataclass
class FormValues:
    """Everything the generate form holds, as plain values (what a generation job and the file need)."""

    prompt: str = ""
    negative_prompt: str = ""
    model: str = ""  # path or name of a checkpoint, or a Core ML folder (mlsd's bundle or converted elsewhere)
    family: str = ""  # "" (the model says) | sd1 | sd2: for Core ML folders whose text width names no family
    sampler: str = DEFAULT_SAMPLER
    steps: int = 20
    cfg_scale: float = 7.0
    clip_skip: int = 1
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_count: int = 1
    batch_size: int = 1
    loras: str = ""  # "name:0.8, other:0.5:1" as --lora takes them, comma separated
    vae: str = ""
    backend: str = "auto"  # mlsd.session.BACKENDS
    compute_unit: str = "auto"  # Core ML: auto | ane | gpu | cpu | all
    device: str = "auto"
    init_image: str = ""
    strength: float = 0.75
    mask: str = ""

    @classmethod
    def from_dict(cls, data: object) -> FormValues:
        """Unknown keys and values of the wrong type are dropped: an old or hand-edited file never stops startup."""
        defaults = cls()
        kwargs = {}
        for f in fields(cls):
            value = data.get(f.name) if isinstance(data, dict) else None
            default = getattr(defaults, f.name)
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if value is not None and type(value) is type(default):
                kwargs[f.name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


class SettingsFile:
    """settings.toml, read once at startup; ``save`` rewrites it atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.error: str | None = None
        self.data: dict = {}
        try:
            if self.path.is_file():
                self.data = tomllib.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            self.error = f"{self.path}: {e}"

    @property
    def tui(self) -> dict:
        table = self.data.get("tui")
        return table if isinstance(table, dict) else {}

    def last_form(self) -> FormValues:
        return FormValues.from_dict(self.tui.get("last"))

    def get_path(self, key: str) -> Path | None:
        value = self.tui.get(key)
        return Path(value).expanduser() if isinstance(value, str) and value else None

    def save(self, *, form: FormValues | None = None, models_dir: Path | None = None,
             output_dir: Path | None = None) -> bool:
        """False when nothing was written: a file that did not parse is left alone so no edit of it is lost."""
        if self.error:
            return False
        table = dict(self.tui)
        if form is not None:
            table["last"] = form.to_dict()
        if models_dir is not None:
            table["models_dir"] = str(models_dir)
        if output_dir is not None:
            table["output_dir"] = str(output_dir)
        self.data["tui"] = table
        write_toml(self.path, self.data)
        return True


def write_toml(path: Path, data: dict) -> None:
    """Temp file beside the target, then os.replace: a crash never leaves half a settings file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dumps(data: dict, _prefix: tuple[str, ...] = ()) -> str:
    """A small TOML writer for what tomllib can read back: scalars, arrays, tables, dates."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = (*_prefix, k)
            lines += ["", f"[{'.'.join(_key(p) for p in name)}]", dumps(v, name).rstrip("\n")]
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # repr gives inf/-inf and exponents in forms TOML accepts
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):  # only reached inside arrays: inline tables
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
