"""Read a weights file into a flat ``{name: tensor}`` dict, with clear errors.

Safetensors headers are validated by hand first so a truncated or corrupt file
gets one actionable message instead of a Rust panic; pickles go through the
restricted unpickler and never execute anything.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlsd.errors import InputFileError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
_MAX_HEADER = 100 * 1024 * 1024
_FIX_REDOWNLOAD = "download the file again (it may be incomplete) or pick another file"


@dataclass
class WeightsFile:
    """A weights file's tensors plus what its container says about them."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    container: str = "safetensors"  # or "pickle"


def read_weights(path: str | Path) -> WeightsFile:
    path = Path(path)
    if not path.exists():
        raise InputFileError("File not found.", where=path, fix="check the path or the model name")
    if path.is_dir():
        raise InputFileError(
            "Expected a weights file but got a folder.",
            where=path,
            fix="pass a .safetensors/.ckpt file (diffusers folders are loaded as models, not weights)",
        )
    size = path.stat().st_size
    if size == 0:
        raise InputFileError("The file is empty (0 bytes).", where=path, fix=_FIX_REDOWNLOAD)
    kind = sniff_container(path)
    if kind == "safetensors":
        return _read_safetensors(path, size)
    if kind == "pickle":
        return _read_pickle(path)
    raise InputFileError(
        f"Unknown file type '{path.suffix or '(no extension)'}': neither safetensors nor a PyTorch pickle.",
        where=path,
        fix="use a .safetensors or .ckpt checkpoint",
    )


def sniff_container(path: Path) -> str | None:
    """Decide by content, not extension: A1111 users rename files freely."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip archive / legacy pickle protocol >= 2
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return "safetensors"  # let the header check explain what is wrong
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "pickle"
    return None


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate the JSON header; raises InputFileError on any inconsistency."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise InputFileError("Safetensors file is too short to hold a header.", where=path, fix=_FIX_REDOWNLOAD)
        (n,) = struct.unpack("<Q", raw_len)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise InputFileError(
                f"Safetensors header length {n} does not fit a {size}-byte file: the file is corrupt or not safetensors.",
                where=path,
                fix=_FIX_REDOWNLOAD,
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputFileError(f"Safetensors header is not valid JSON ({e}).", where=path, fix=_FIX_REDOWNLOAD) from e
    if not isinstance(header, dict):
        raise InputFileError("Safetensors header is not a JSON object.", where=path, fix=_FIX_REDOWNLOAD)
    data_len = size - 8 - n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data_len:
        raise InputFileError(
            f"Safetensors file is truncated: its header promises {end} bytes of tensor data, the file holds {data_len}.",
            where=path,
            fix=_FIX_REDOWNLOAD,
        )
    return header


def _read_safetensors(path: Path, size: int) -> WeightsFile:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    try:
        tensors = load_file(str(path))  # memory-mapped: multi-GB files cost no copy up front
    except (SafetensorError, OSError, ValueError) as e:
        raise InputFileError(f"Safetensors data is corrupt ({e}).", where=path, fix=_FIX_REDOWNLOAD) from e
    meta = header.get("__metadata__") or {}
    return WeightsFile(path, tensors, {str(k): str(v) for k, v in meta.items()}, "safetensors")


def _read_pickle(path: Path) -> WeightsFile:
    from mlsd.checkpoints.safe_pickle import safe_torch_load

    obj = safe_torch_load(path)
    # Lightning checkpoints nest the weights; some trainers nest twice.
    for _ in range(2):
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputFileError(
            f"The pickle holds a {type(obj).__name__}, not a dictionary of weights.",
            where=path,
            fix="use a checkpoint saved as a state dict (.safetensors or .ckpt)",
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputFileError("The file holds no tensors.", where=path, fix="pick a model or LoRA weights file")
    return WeightsFile(path, tensors, {}, "pickle")
