"""Typed messages the background workers post to the screens (post_message is thread-safe)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from textual.message import Message

from mlsd.errors import MlsdError
from tui.flags import render_for_form


def describe_error(error: BaseException, fields: dict | None = None) -> tuple[str, str]:
    """(title, text) for a notification: mlsd's what/where/fix, or, for a bug, the exception and where it
    was raised (enough for a bug report). ``fields``: the screen's flag -> form field names (tui.flags)."""
    if isinstance(error, MlsdError):
        return error.title, render_for_form(error, fields) if fields else error.render()
    text = f"{type(error).__name__}: {error}"
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        text += f"\n  at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})"
    return "Unexpected error", text


class Generation:
    """From the generation worker: Started once the job resolved (Failed instead when it did not), one
    Preview per step, then exactly one of Finished, Cancelled, Failed.

    None bubble: each is meant for the screen whose worker posted it, not for the app above it.
    """

    @dataclass
    class Started(Message, bubble=False):
        backend: str  # torch | coreml | coreml-reference
        why: str
        model: Path

    @dataclass
    class Preview(Message, bubble=False):
        step: int
        total: int
        image: Image.Image
        batch: int = 0
        batch_count: int = 1
        it_per_s: float = 0.0

        def can_replace(self, message: Message) -> bool:
            # A slow terminal must not fall behind the sampler: a queued preview is dropped for a newer one.
            return isinstance(message, Generation.Preview)

        @property
        def eta(self) -> float | None:
            if self.it_per_s <= 0:
                return None
            left = (self.total - self.step) + (self.batch_count - self.batch - 1) * self.total
            return left / self.it_per_s

    @dataclass
    class Finished(Message, bubble=False):
        paths: list[Path]
        seconds: float
        seeds: list[int] = field(default_factory=list)
        image: Image.Image | None = None
        grid: Path | None = None

    @dataclass
    class Cancelled(Message, bubble=False):
        step: int
        total: int

    @dataclass
    class Failed(Message, bubble=False):
        error: BaseException


class Catalog:
    @dataclass
    class Scanned(Message, bubble=False):
        """Model entries with their families filled in (models directory listing)."""

        entries: list

    @dataclass
    class Hashed(Message, bubble=False):
        path: Path
        short_hash: str | None
        error: str | None = None


class Conversion:
    """From the conversion worker: Stage messages as each part starts and ends ("load" for reading the
    checkpoint, the converter's components, then "verify"), then exactly one of Done, Cancelled, Failed."""

    @dataclass
    class Stage(Message, bubble=False):
        component: str  # "load" | text_encoder | unet | vae_decoder | vae_encoder | "verify"
        state: str  # "start" | "done" | "reused"
        seconds: float

    @dataclass
    class Done(Message, bubble=False):
        bundle: Path
        seconds: float  # the whole job
        checks: list | None = None  # converters.coreml.verify.Check per output; None: not verified
        timings: dict = field(default_factory=dict)  # stage -> seconds

        @property
        def verified(self) -> bool:
            return self.checks is not None and all(c.passed for c in self.checks)

    @dataclass
    class Cancelled(Message, bubble=False):
        stage: str  # the stage that was running; nothing was published unless it was "verify"
        bundle: Path | None = None  # set when the bundle was published before the cancel (verify skipped)

    @dataclass
    class Failed(Message, bubble=False):
        error: BaseException
