"""The models directory: family, A1111 hash (computed in the background, cached) and Core ML folders (mlsd's
bundles and those converted elsewhere, with their layout, size and attention as `mlsd models` lists them)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import get_current_worker

from tui.catalog import ModelEntry, describe_entry, list_models
from tui.messages import Catalog
from tui.workers import hash_models

COLUMNS = ("Kind", "Name", "Family", "Hash", "Core ML")
KIND_LABELS = {"checkpoint": "checkpoint", "lora": "LoRA", "vae": "VAE", "coreml": "Core ML"}


def all_entries(root) -> list[ModelEntry]:
    entries = list_models(root)
    bundles = [e for e in entries if e.kind == "coreml"]
    checkpoints = [e for e in entries if e.kind == "checkpoint"]
    extra = [ModelEntry(kind, p) for kind in ("lora", "vae") for p in root.list(kind)]
    return checkpoints + extra + bundles


class ModelsScreen(Screen):
    BINDINGS = [Binding("ctrl+r", "refresh", "Refresh")]

    def __init__(self) -> None:
        super().__init__(id="models-screen")
        self.entries: list[ModelEntry] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="models-root", markup=False)
        yield DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        root = self.app.models
        self.sub_title = f"models: {root.root}"
        self.query_one("#models-root", Static).update(
            f"Models directory: {root.root} (from {root.source}). Hashes are A1111's short hashes, cached.")
        self.entries = all_entries(root)
        table = self.query_one(DataTable)
        table.clear()
        for e in self.entries:
            coreml = (", ".join(b.name for b in e.coreml) or "no") if e.kind == "checkpoint" else ""
            coreml = "..." if e.kind == "coreml" else coreml  # its layout, once described
            family = "..."
            hash_cell = "" if e.kind == "coreml" else "..."  # a folder has no single file for A1111's hash
            table.add_row(KIND_LABELS[e.kind], Text(e.name), family, hash_cell, Text(coreml), key=str(e.path))
        if not self.entries:
            table.add_row("", Text(f"nothing in {root.root} (A1111 layout: Stable-diffusion/, Lora/, VAE/)"),
                          "", "", "")
        self._describe_and_hash(self.entries)

    @work(thread=True, exclusive=True, group="models", exit_on_error=False)
    def _describe_and_hash(self, entries: list[ModelEntry]) -> None:
        worker = get_current_worker()
        for entry in entries:
            if worker.is_cancelled:
                return
            self.post_message(Catalog.Scanned([describe_entry(entry)]))
        hash_models([(e.path, e.kind) for e in entries if e.error is None and e.kind != "coreml"], self.post_message,
                    lambda: worker.is_cancelled)

    def _set(self, path: Path, column: str, value) -> None:
        table = self.query_one(DataTable)
        try:
            table.update_cell(str(path), column, value, update_width=True)
        except Exception:  # noqa: BLE001 - the table was refreshed meanwhile; that row is gone
            pass

    def on_catalog_scanned(self, message: Catalog.Scanned) -> None:
        for entry in message.entries:
            if entry.kind == "coreml":  # the reason goes in the last column, where a long line fits
                family = Text("unreadable", style="red") if entry.error else Text(entry.family or "?")
                detail = Text(entry.error, style="red") if entry.error else Text(entry.coreml_detail)
                self._set(entry.path, "Core ML", detail)
            else:
                family = Text(f"unreadable: {entry.error}", style="red") if entry.error else Text(entry.family or "?")
            self._set(entry.path, "Family", family)
            if entry.error:
                self._set(entry.path, "Hash", "")

    def on_catalog_hashed(self, message: Catalog.Hashed) -> None:
        self._set(message.path, "Hash", message.short_hash or Text(message.error or "?", style="red"))
