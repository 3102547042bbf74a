"""Wall time and peak resident memory, without third-party tools.

Peak RSS of a whole process comes from the kernel (ru_maxrss); the peak inside one stage of a
running process is sampled from /proc (Linux) every 50 ms, which is what a per-component figure needs.
"""

from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9


def rss_bytes() -> int:
    """Current resident set of this process (Linux /proc; elsewhere the peak so far, the best available)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def peak_rss_bytes(children: bool = False) -> int:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


@dataclass
class RssSampler:
    """Background sampler; `mark()` starts a new stage, `stages` holds (name, seconds, peak bytes)."""

    interval: float = 0.05
    stages: list[tuple[str, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._name, self._t0, self._peak = "start", time.perf_counter(), rss_bytes()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_bytes()
            with self._lock:
                self._peak = max(self._peak, value)

    def mark(self, name: str) -> None:
        """Close the running stage and open `name`."""
        now = time.perf_counter()
        with self._lock:
            self._peak = max(self._peak, rss_bytes())
            self.stages.append((self._name, now - self._t0, self._peak))
            self._name, self._t0, self._peak = name, now, rss_bytes()

    def stop(self) -> None:
        self.mark("end")
        self._stop.set()
        self._thread.join()


def median_pairs(first, second, pairs: int = 3) -> tuple[float, float, list[tuple[float, float]]]:
    """Run first/second alternately `pairs` times (order swapped every pair, so warm caches and clock
    drift hit both equally); medians of each side's wall seconds, plus the raw pairs."""
    runs = []
    for i in range(pairs):
        order = (first, second) if i % 2 == 0 else (second, first)
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - t0
        runs.append((times[first], times[second]))
    return statistics.median(a for a, _ in runs), statistics.median(b for _, b in runs), runs
