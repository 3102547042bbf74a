"""File hashes written into infotext: sha256, A1111's short model hash, LoRA hashes, the JSON cache."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mlsd.errors import InputFileError
from mlsd.hashes import addnet_hash_safetensors, file_sha256, lora_short_hash, model_short_hash


def test_sha256_and_model_short_hash(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(os.urandom(3 << 20 | 123))  # more than one read block
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path, cache=False) == expected
    assert model_short_hash(path, cache=tmp_path / "h.json") == expected[:10]


def test_addnet_hash_skips_safetensors_header(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path), metadata={"ss_network_dim": "4"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + n :]).hexdigest()
    assert addnet_hash_safetensors(path, cache=False) == expected != hashlib.sha256(data).hexdigest()
    assert lora_short_hash(path, cache=False) == expected[:12]
    stored = tmp_path / "stored.safetensors"
    save_file({"w": torch.zeros(4)}, str(stored), metadata={"sshs_model_hash": "abcdef0123456789" * 4})
    assert lora_short_hash(stored, cache=False) == "abcdef012345"
    pt = tmp_path / "old.pt"
    pt.write_bytes(b"pickle bytes")
    assert lora_short_hash(pt, cache=False) == hashlib.sha256(b"pickle bytes").hexdigest()[:12]
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(InputFileError):
        addnet_hash_safetensors(tmp_path / "bad.safetensors", cache=False)


def test_hash_cache_hits_and_invalidates(tmp_path):
    cache = tmp_path / "cache" / "hashes.json"
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"A" * 1000)
    first = file_sha256(path, cache=cache)
    st = path.stat()
    assert json.loads(cache.read_text())["files"][f"sha256:{path.resolve()}"]["sha256"] == first
    # Same size and mtime but other bytes: a cache hit returns the old hash, proving no re-read.
    path.write_bytes(b"B" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(path, cache=cache) == first
    assert file_sha256(path, cache=False) == hashlib.sha256(b"B" * 1000).hexdigest()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # mtime changed
    assert file_sha256(path, cache=cache) == hashlib.sha256(b"B" * 1000).hexdigest()
    path.write_bytes(b"C" * 999)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # only the size changed
    assert file_sha256(path, cache=cache) == hashlib.sha256(b"C" * 999).hexdigest()
    assert sorted(p.name for p in cache.parent.iterdir()) == ["hashes.json"]  # no temp files left


def test_corrupt_cache_is_ignored(tmp_path):
    cache = tmp_path / "hashes.json"
    cache.write_text("{not json")
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    assert file_sha256(path, cache=cache) == hashlib.sha256(b"x").hexdigest()
    assert json.loads(cache.read_text())["version"] == 1
