"""File hashes as A1111 writes them into infotext: sha256, the short model hash, LoRA hashes.

Hashing a multi-GB checkpoint takes seconds, so results are cached in a JSON file keyed by the
file's absolute path, size and mtime; a changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mlsd.errors import InputFileError


def default_hash_cache() -> Path:
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / "mlsd" / "hashes.json"
    return Path(user_cache_dir("mlsd")) / "hashes.json"


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == 1 else None
    return files if isinstance(files, dict) else {}


def _save_cache(path: Path, files: dict[str, Any]) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "files": files}, f, indent=0)
        os.replace(tmp, path)  # readers never see a half-written cache
    except OSError:
        # The cache only saves time; a read-only cache dir must not stop generation.
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _safetensors_header_len(f, size: int, path: Path) -> int:
    n = int.from_bytes(f.read(8), "little")
    if size < 8 or n + 8 > size:
        raise InputFileError("Not a valid safetensors file (header length is wrong).", where=path,
                             fix="re-download the file; it is truncated or not safetensors")  # fmt: skip
    return n


def _compute(path: Path, kind: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if kind == "addnet":
            f.seek(8 + _safetensors_header_len(f, size, path))
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _hash(path: str | os.PathLike, kind: str, cache: bool | str | os.PathLike) -> str:
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise InputFileError(f"Cannot read file to hash it: {e.strerror}.", where=p,
                             fix="check the path") from None  # fmt: skip
    cache_file = default_hash_cache() if cache is True else (Path(cache) if cache else None)
    key = f"{kind}:{p}"
    hit = _load_cache(cache_file).get(key) if cache_file else None
    hit = hit if isinstance(hit, dict) else {}
    if (hit.get("size"), hit.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) and isinstance(
        hit.get("sha256"), str
    ):
        return hit["sha256"]
    digest = _compute(p, kind, st.st_size)
    if cache_file:
        files = _load_cache(cache_file)  # re-read: another process may have added entries meanwhile
        files[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        _save_cache(cache_file, files)
    return digest


def file_sha256(path: str | os.PathLike, *, cache: bool | str | os.PathLike = True) -> str:
    """Full sha256 of a file. ``cache``: True = default cache file, a path, or False for none."""
    return _hash(path, "sha256", cache)


def model_short_hash(path: str | os.PathLike, *, cache: bool | str | os.PathLike = True) -> str:
    """A1111's ``Model hash`` / ``VAE hash``: first 10 hex digits of the file's sha256."""
    return file_sha256(path, cache=cache)[:10]


def addnet_hash_safetensors(path: str | os.PathLike, *, cache: bool | str | os.PathLike = True) -> str:
    """kohya/A1111 "addnet" hash: sha256 of everything after the safetensors header."""
    return _hash(path, "addnet", cache)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    p = Path(path)
    with open(p, "rb") as f:
        n = _safetensors_header_len(f, p.stat().st_size, p)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise InputFileError("The safetensors header is not valid JSON.", where=p,
                                 fix="re-download the file") from None  # fmt: skip
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def lora_short_hash(path: str | os.PathLike, *, cache: bool | str | os.PathLike = True) -> str:
    """A1111's ``Lora hashes`` value: 12 hex digits, from ``sshs_model_hash`` metadata if the
    trainer stored one, else the addnet hash (safetensors) or the plain sha256 (other formats)."""
    if str(path).lower().endswith(".safetensors"):
        stored = read_safetensors_metadata(path).get("sshs_model_hash", "").strip()
        return (stored or addnet_hash_safetensors(path, cache=cache))[:12]
    return file_sha256(path, cache=cache)[:12]
