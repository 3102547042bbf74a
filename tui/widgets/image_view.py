"""The picture area: live previews and final images through textual-image."""

from __future__ import annotations

from PIL import Image
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

# textual-image asks the terminal which graphics it speaks (Kitty, Sixel, else half cells) when this
# module is imported, which must happen before the app takes over the terminal: keep it at module level.
from textual_image.widget import Image as ImageWidget


class ImageView(Vertical):
    def __init__(self, placeholder: str = "", id: str | None = None):
        super().__init__(id=id, classes="image-view")
        self._placeholder = placeholder
        self.image: Image.Image | None = None

    def compose(self) -> ComposeResult:
        yield ImageWidget(None, classes="picture")
        yield Static(self._placeholder, classes="caption", markup=False)

    def show(self, image: Image.Image | None, caption: str = "") -> None:
        self.image = image
        self.query_one(ImageWidget).image = image
        self.query_one(".caption", Static).update(caption if image is not None or caption else self._placeholder)

    def clear(self, caption: str | None = None) -> None:
        self.show(None, self._placeholder if caption is None else caption)
