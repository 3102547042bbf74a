"""Shared fixtures: tiny seeded checkpoints written once per session in the real A1111 layout."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools draws a progress bar per compiler pass
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are hundreds of tiny ops: one torch thread is fastest, and several only contend when
    other jobs share the CPU (measured: 0.1 s per forward on one thread vs 1-30 s on two under load).
    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoints, tmp_path_factory):
    """Factory: tiny_bundles(name, family='sd1', inpainting=False, loras=(), **options) -> bundle path.

    Conversions are the slow part of the suite: each distinct bundle is converted once per session.
    """
    from converters.cli import quiet_coremltools
    from converters.coreml.convert import ConvertOptions, convert_checkpoint

    quiet_coremltools()
    root = tmp_path_factory.mktemp("bundles")
    cache: dict = {}

    def make(name: str, family: str = "sd1", inpainting: bool = False, loras=(), **options):
        if name not in cache:
            path, _ = tiny_checkpoints(family, inpainting)
            opts = ConvertOptions(**({"sizes": [(64, 64)]} | options))
            cache[name] = convert_checkpoint(path, root / name, options=opts, loras=list(loras))
        return cache[name]

    return make
