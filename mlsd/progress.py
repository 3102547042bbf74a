"""A one-line terminal progress bar for long work (generation steps, conversion stages)."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class StepBar:
    """Redraws in place on a TTY; silent otherwise (logs and pipes stay clean)."""

    def __init__(self, stream=None, enabled: bool | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self._last = 0.0

    def update(self, label: str, step: int, total: int, elapsed: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if step < total and now - self._last < 0.05:
            return  # redrawing faster than the eye helps nobody and costs step time
        self._last = now
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (total - step) / rate if rate > 0 else 0.0
        filled = int(self.width * step / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{label} [{bar}] {step}/{total} {rate:.2f} it/s ETA {_clock(eta)} ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
