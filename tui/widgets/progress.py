"""Progress of a generation: a bar with step / it/s / ETA beside it, and a status line under it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


class GenerationProgress(Vertical):
    backend: str = ""  # shown while sampling: "Sampling on coreml-reference..."

    def compose(self) -> ComposeResult:
        with Horizontal(id="progress-row"):
            # A known total from the start: an indeterminate bar animates, and the bar's own ETA guesses
            # from wall time where the sampler knows its it/s.
            yield ProgressBar(total=100, show_percentage=True, show_eta=False, id="progress-bar")
            yield Label("", id="progress-steps", markup=False)
        yield Label("Ready.", id="progress-status", markup=False)

    @property
    def status(self) -> str:
        return str(self.query_one("#progress-status", Label).content)

    @property
    def steps(self) -> str:
        return str(self.query_one("#progress-steps", Label).content)

    def set_status(self, text: str) -> None:
        self.query_one("#progress-status", Label).update(text)

    def start(self, total: int, text: str = "Loading model...") -> None:
        self.query_one(ProgressBar).update(total=max(total, 1), progress=0)
        self.query_one("#progress-steps", Label).update("")
        self.backend = ""
        self.set_status(text)

    def step(self, step: int, total: int, it_per_s: float, eta: float | None, batch: int = 0,
             batch_count: int = 1) -> None:
        self.query_one(ProgressBar).update(total=total * batch_count, progress=batch * total + step)
        parts = [f"step {step}/{total}", f"{it_per_s:.2f} it/s"]
        if batch_count > 1:
            parts.insert(0, f"batch {batch + 1}/{batch_count}")
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        self.query_one("#progress-steps", Label).update(" · ".join(parts))
        on = f" on {self.backend}" if self.backend else ""
        self.set_status(f"Sampling{on}... (escape cancels)")

    def finish(self, text: str, complete: bool = True) -> None:
        bar = self.query_one(ProgressBar)
        if complete and bar.total:
            bar.update(progress=bar.total)
        self.set_status(text)
