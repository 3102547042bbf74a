"""F5: checkpoint (+ LoRAs) to a Core ML bundle, when this build has the converter."""

from __future__ import annotations

import importlib
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Log, Select, Static

from mlsd.errors import MlsdError, UsageError
from tui.messages import Conversion, describe_error
from tui.workers import run_conversion


def load_converter():
    """The converter module, or the reason it cannot be used (not shipped, coremltools missing...)."""
    try:
        module = importlib.import_module("converters.coreml.convert")
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing here: not available
        return None, f"{type(e).__name__}: {e}"
    if not hasattr(module, "convert_checkpoint"):
        return None, "converters.coreml.convert has no convert_checkpoint"
    return module, ""


def _row(label: str, widget) -> Horizontal:
    return Horizontal(Label(label, classes="field-label"), widget, classes="field")


class ConvertScreen(Screen):
    BINDINGS = [Binding("ctrl+g", "convert", "Convert", priority=True)]

    def __init__(self) -> None:
        super().__init__(id="convert-screen")
        self.converter = None
        self.reason = ""
        self.running = False

    def compose(self) -> ComposeResult:
        self.converter, self.reason = load_converter()
        yield Header()
        if self.converter is None:
            yield Static("Conversion to Core ML is not available in this build.\n\n"
                         f"Reason: {self.reason}\n\nGenerate with PyTorch meanwhile (F2).",
                         id="convert-unavailable", markup=False)
            yield Footer()
            return
        c = self.converter
        checkpoints = self.app.models.list("checkpoint")
        with Vertical(id="convert-form"):
            chosen = self.app.current_model()
            value = chosen if chosen in {str(p) for p in checkpoints} else (str(checkpoints[0]) if checkpoints
                                                                           else Select.NULL)
            yield _row("Checkpoint", Select([(p.name, str(p)) for p in checkpoints], id="convert-model",
                                            prompt="(pick a checkpoint)" if checkpoints else "(no checkpoints found)",
                                            value=value, compact=True))
            yield _row("LoRAs", Input(placeholder="name:0.8, other:0.5 (merged in)", id="convert-loras",
                                      compact=True))
            yield _row("Attention", Select([(a, a) for a in c.ATTENTIONS], value=c.ATTENTIONS[0],
                                           allow_blank=False, id="convert-attention", compact=True))
            yield _row("UNet chunks", Input("2", type="integer", id="convert-chunks", compact=True))
            yield _row("Quantize", Select([("none", "none"), ("8 bit", "8"), ("6 bit", "6"), ("4 bit", "4")],
                                          value="none", allow_blank=False, id="convert-quantize", compact=True))
            yield _row("Size", Input("512x512", id="convert-size", compact=True))
            yield Button("Convert  ctrl+g", id="convert-start", variant="primary")
            yield Static("", id="convert-target", markup=False)
        yield Log(id="convert-log")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "convert-start":
            self.action_convert()

    def _options(self):
        c = self.converter
        try:
            chunks = int(self.query_one("#convert-chunks", Input).value)
            width, height = (int(v) for v in self.query_one("#convert-size", Input).value.lower().split("x"))
        except ValueError:
            raise UsageError("Chunks must be a whole number and size WIDTHxHEIGHT.", where="Convert form",
                             fix="e.g. chunks 2, size 512x512") from None
        bits = self.query_one("#convert-quantize", Select).value
        return c.ConvertOptions(attention=str(self.query_one("#convert-attention", Select).value), chunks=chunks,
                                quantize_bits=None if bits == "none" else int(bits), sizes=[(width, height)])

    def action_convert(self) -> None:
        if self.converter is None or self.running:
            return
        from mlsd.session import resolve_loras

        log = self.query_one(Log)
        try:
            model = self.query_one("#convert-model", Select).value
            if model is Select.NULL:
                raise UsageError("No checkpoint selected.", where="Checkpoint", fix="pick one to convert")
            options = self._options()
            options.validate()
            text = self.query_one("#convert-loras", Input).value
            loras = resolve_loras(self.app.models, [s.strip() for s in text.split(",") if s.strip()])
            bundle = self.converter.default_bundle_path(self.app.models.root, Path(model),
                                                        [c.path for c in loras], options)
        except MlsdError as e:
            title, message = describe_error(e)
            self.notify(message, title=title, severity="error", markup=False)
            return
        self.running = True
        self.query_one("#convert-target", Static).update(f"Writing {bundle}")
        log.write_line(f"converting {Path(model).name} -> {bundle}")
        self._convert(Path(model), bundle, options, loras)

    @work(thread=True, exclusive=True, group="convert", exit_on_error=False)
    def _convert(self, checkpoint: Path, bundle: Path, options, loras) -> None:
        run_conversion(checkpoint, bundle, options, loras, self.post_message)

    def on_conversion_stage(self, message: Conversion.Stage) -> None:
        took = f" ({message.seconds:.1f} s)" if message.state == "done" else ""
        self.query_one(Log).write_line(f"{message.component}: {message.state}{took}")

    def on_conversion_done(self, message: Conversion.Done) -> None:
        self.running = False
        self.query_one(Log).write_line(f"done in {message.seconds:.1f} s: {message.bundle}")
        self.notify(f"Core ML bundle written: {message.bundle}", markup=False)

    def on_conversion_failed(self, message: Conversion.Failed) -> None:
        self.running = False
        title, text = describe_error(message.error)
        self.query_one(Log).write_line(f"failed: {title}")
        self.notify(text, title=title, severity="error", timeout=12, markup=False)
