"""Handing memory back to the OS once a big model part is done with (the converter's stages).

Checkpoints are memory-mapped, so their weights live in file-backed pages of one mapping. Dropping a
component's tensors frees nothing while other tensors of the same file stay alive: the pages it touched
stay resident, counted in the process's RSS (a full SD1.5 UNet: 1.7 GB through the whole conversion).
`drop_file_pages` tells the kernel those pages are not needed any more.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Iterable

import torch

_MADV_DONTNEED = 4  # Linux


def tensor_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """(address, bytes) of each tensor's data."""
    return [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if t.numel()]


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, size in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], start + size)
        else:
            out.append([start, start + size])
    return [(a, b) for a, b in out]


def _file_mappings() -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    return spans


def drop_file_pages(ranges: list[tuple[int, int]]) -> int:
    """Release the resident pages wholly inside `ranges` that belong to a file mapping; returns bytes.

    Only for tensors that are no longer used. Pages shared with any byte outside `ranges` are kept,
    and anonymous memory is never touched (the allocator may have reused it), so live data is safe:
    a dropped file page reads back from the file if anything ever touches it again. Linux only; a
    no-op elsewhere.
    """
    if not sys.platform.startswith("linux") or not ranges:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    files = _file_mappings()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end in _merged(ranges):
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and any(a <= lo and hi <= b for a, b in files):
            if libc.madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
                dropped += hi - lo
    return dropped


def release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise, so the next stage's
    peak would stack on this one's). A no-op where glibc is not the allocator."""
    import ctypes.util

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
