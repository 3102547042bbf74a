"""Shared fixtures: tiny seeded checkpoints written once per session in the real A1111 layout."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Factory: tiny_checkpoints(family, inpainting=False, suffix='.safetensors', **kw) -> (path, TinyModel)."""
    from mlsd.demo.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict = {}

    def make(family: str = "sd1", inpainting: bool = False, suffix: str = ".safetensors", **kw):
        key = (family, inpainting, suffix, tuple(sorted(kw.items(), key=lambda x: x[0])))
        if key not in cache:
            name = "-".join([family, "inpaint" if inpainting else "base", *(f"{k}{v}" for k, v in sorted(kw.items()))])
            path = root / (name.replace(".", "_") + suffix)
            cache[key] = (path, write_checkpoint(path, family, inpainting=inpainting, **kw))
        return cache[key]

    return make


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
