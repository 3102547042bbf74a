"""Outputs, newest first, with the parameters stored in each PNG; r (or enter) reuses them."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, ListItem, ListView, Static

from tui.widgets.image_view import ImageView

MAX_ITEMS = 500  # a listing of years of outputs would only slow the screen down


def list_outputs(root: Path) -> list[Path]:
    """Images under the outputs root, newest first (ties: the higher file number first)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.rglob("*"):
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and not p.name.startswith("."):
            try:
                found.append((p.stat().st_mtime_ns, str(p), p))
            except OSError:  # removed while we looked (another mlsd run, a file manager)
                continue
    found.sort(reverse=True)
    return [p for _, _, p in found[:MAX_ITEMS]]


class GalleryScreen(Screen):
    BINDINGS = [
        Binding("r", "reuse", "Reuse parameters"),
        Binding("ctrl+r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__(id="gallery-screen")
        self.paths: list[Path] = []
        self.params = None  # GenerationParams of the highlighted image, when it has any
        self.recorded: dict | None = None  # what the TUI recorded when it made that image (tui.history)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="gallery-main"):
            yield ListView(id="gallery-list")
            with Vertical(id="gallery-detail"):
                yield ImageView("No images yet: make one on the Generate screen (F2).", id="gallery-image")
                yield Static("", id="gallery-folder", markup=False)
                with VerticalScroll(id="gallery-params-box"):
                    yield Static("", id="gallery-params", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"outputs: {self.app.output_dir}"

    async def on_screen_resume(self) -> None:
        await self.action_refresh()

    async def action_refresh(self) -> None:
        self.paths = list_outputs(self.app.output_dir)
        view = self.query_one(ListView)
        await view.clear()
        root = self.app.output_dir
        await view.extend(ListItem(Label(_relative(p, root), markup=False)) for p in self.paths)
        if self.paths:
            view.index = 0
            self._show(0)
        else:
            self._show(None)
        view.focus()

    def on_list_view_highlighted(self, event: ListView.Highlighted) -> None:
        self._show(event.list_view.index)

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        self.action_reuse()

    def _show(self, index: int | None) -> None:
        from PIL import Image

        from mlsd.infotext import GenerationParams, read_image_parameters

        view = self.query_one("#gallery-image", ImageView)
        folder = self.query_one("#gallery-folder", Static)
        text = self.query_one("#gallery-params", Static)
        self.params = self.recorded = None
        if index is None or not 0 <= index < len(self.paths):
            view.clear()
            folder.update("")
            text.update("")
            return
        path = self.paths[index]
        folder.update(f"Folder: {path.parent}")
        try:
            with Image.open(path) as im:
                im.load()
                view.show(im.copy(), path.name)
            found = read_image_parameters(path)
        except Exception as e:  # noqa: BLE001 - a broken or vanished file is shown as such, never fatal
            view.clear(f"Cannot read {path.name}: {getattr(e, 'what', e)}")
            text.update("")
            return
        if found.source == "a1111":
            self.params = GenerationParams.from_infotext(found.raw)
            self.recorded = self.app.history.lookup(path, found.raw)
            made = ""
            if self.recorded:
                r = self.recorded
                ran = f" (ran on {r['ran_on']})" if r.get("ran_on") and r.get("ran_on") != r.get("backend") else ""
                made = (f"\n\nMade here with {Path(r.get('model', '')).name}: backend {r.get('backend')}{ran}, "
                        f"compute unit {r.get('compute_unit')}, device {r.get('device')}")
            text.update(found.raw + made)
        else:
            text.update(found.note or "No generation parameters in this image.")

    def action_reuse(self) -> None:
        if self.params is None:
            self.notify("This image carries no parameters to reuse.", severity="warning")
            return
        self.app.reuse(self.params, self.recorded)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
