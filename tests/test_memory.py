"""Handing a memory-mapped checkpoint's pages back: RSS really drops, live tensors keep their values."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsd.memory import drop_file_pages, tensor_ranges

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux only")


def _rss_file() -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


def test_dropped_tensors_pages_leave_rss_and_live_neighbours_stay_intact(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a_dropped": torch.randn(4_000_000, generator=g), "b_live": torch.randn(1000, generator=g),
               "c_dropped": torch.randn(4_000_000, generator=g)}
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    loaded = load_file(str(path))  # memory-mapped, like mlsd's loader
    assert all(float(t.sum()) == pytest.approx(float(tensors[k].sum()), rel=1e-5) for k, t in loaded.items())
    before = _rss_file()
    ranges = tensor_ranges([loaded.pop("a_dropped"), loaded.pop("c_dropped")])
    dropped = drop_file_pages(ranges)
    assert dropped > 0.95 * 2 * 4_000_000 * 4
    assert before - _rss_file() > 0.9 * dropped  # the kernel really took them back
    assert torch.equal(loaded["b_live"], tensors["b_live"])  # the page it shares with both is kept


def test_anonymous_memory_is_never_dropped():
    block = torch.randn(4_000_000)
    copy = block.clone()
    assert drop_file_pages(tensor_ranges([block])) == 0
    assert torch.equal(block, copy)
