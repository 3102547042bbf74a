"""A prompt box with A1111's token counter ("12/75", "80/150") above it."""

from __future__ import annotations

import functools

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, TextArea
from textual.worker import get_current_worker


@functools.cache
def _tokenizer():
    # The shipped CLIP tokenizer: counting needs no model, and SD1/SD2 count the same way.
    from mlsd.families import SD1, load_tokenizer

    return load_tokenizer(SD1)


def count_label(text: str) -> str:
    from mlsd.prompts import count_tokens
    from tui.workers import warm_imports

    warm_imports()
    try:
        used, capacity = count_tokens(text, _tokenizer())
    except Exception:  # noqa: BLE001 - a counter must never take the prompt box down with it
        return "?/75"
    return f"{used}/{capacity}"


class PromptArea(Vertical):
    """Title row with the live token count, then a multi-line TextArea (Tab leaves it, as in a form)."""

    def __init__(self, title: str, *, text: str = "", placeholder: str = "", id: str | None = None):
        super().__init__(id=id, classes="prompt-area")
        self._title = title
        self._initial = text
        self._placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Horizontal(classes="prompt-title"):
            yield Label(self._title, classes="prompt-label")
            yield Label("0/75", classes="token-count")
        yield TextArea(self._initial, tab_behavior="focus", soft_wrap=True, placeholder=self._placeholder,
                       id=f"{self.id}-text" if self.id else None)

    def on_mount(self) -> None:
        if self._initial:
            self._count(self._initial)

    @property
    def text_area(self) -> TextArea:
        return self.query_one(TextArea)

    @property
    def text(self) -> str:
        return self.text_area.text

    @text.setter
    def text(self, value: str) -> None:
        self.text_area.load_text(value)

    @property
    def count(self) -> str:
        return str(self.query_one(".token-count", Label).content)

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        self._count(event.text_area.text)

    @work(thread=True, exclusive=True, group="tokens", exit_on_error=False)
    def _count(self, text: str) -> None:
        # A thread: the first call loads the tokenizer (about a second); typing never waits for it.
        label = count_label(text)
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self.query_one(".token-count", Label).update, label)
