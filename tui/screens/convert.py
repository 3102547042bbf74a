"""F5: checkpoint (+ LoRAs, VAE) to a verified Core ML bundle, stage by stage, as `mlsd convert` does it."""

from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    Log,
    ProgressBar,
    Select,
    Static,
)
from textual.worker import get_current_worker

from mlsd.errors import MlsdError, UsageError
from tui.flags import CONVERT_FIELDS
from tui.messages import Conversion, describe_error
from tui.widgets.params import with_lora
from tui.widgets.progress import format_seconds
from tui.workers import ConversionJob, run_conversion

QUANTIZE = (("none", "none"), ("8 bit", "8"), ("6 bit", "6"), ("4 bit", "4"))
COMPONENT_LABELS = {"text_encoder": "Text encoder", "unet": "UNet", "vae_decoder": "VAE decoder",
                    "vae_encoder": "VAE encoder (img2img)"}
STAGE_LABELS = {"load": "load checkpoint", "verify": "verify (reference executor)"}
CHECK_COLUMNS = ("Component", "Output", "PSNR dB", "Max abs error", "Result")


def load_converter():
    """The converter module, or the reason it cannot be used (not shipped, coremltools missing...)."""
    try:
        module = importlib.import_module("converters.coreml.convert")
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing here: not available
        return None, f"{type(e).__name__}: {e}"
    if not hasattr(module, "convert_checkpoint"):
        return None, "converters.coreml.convert has no convert_checkpoint"
    return module, ""


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            width, height = (int(v) for v in part.lower().strip().split("x"))
        except ValueError:
            raise UsageError(f"Size '{part.strip()}' is not WIDTHxHEIGHT.", where="Sizes field",
                             fix="type e.g. 512x512, or several: 512x512,512x768") from None
        sizes.append((width, height))
    return sizes


class FormColumn(VerticalScroll, can_focus=False):
    """Scrolls, but Tab goes to its fields, not to it (a focused field scrolls into view)."""


def _row(label: str, *widgets) -> Horizontal:
    return Horizontal(Label(label, classes="field-label"), *widgets, classes="field")


class ConvertScreen(Screen):
    BINDINGS = [
        Binding("ctrl+g", "convert", "Convert", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self) -> None:
        super().__init__(id="convert-screen")
        self.converter = None
        self.reason = ""
        self.running = False
        self.result: Conversion.Done | None = None  # the last finished conversion
        self._cancel = threading.Event()
        self._started: dict[str, float] = {}  # stage -> monotonic start, for the live elapsed time
        self._catalog_version = -1

    # ---- layout ------------------------------------------------------------------------------------

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
        models = self.app.models
        self._catalog_version = self.app.catalog_version
        checkpoints = self._checkpoints()
        chosen = self.app.current_model()
        values = [value for _, value in checkpoints]
        with Horizontal(id="convert-main"):
            with FormColumn(id="convert-form"):
                yield Static("Source", classes="section")
                yield _row("Checkpoint", Select(
                    checkpoints, id="convert-model", compact=True,
                    prompt="(pick a checkpoint)" if checkpoints else f"(none in {models.folder('checkpoint')})",
                    value=chosen if chosen in values else (values[0] if values else Select.NULL)))
                yield _row("LoRAs", Input(placeholder="name:0.8, other:0.5 (merged into the weights)",
                                          id="convert-loras", compact=True))
                yield _row("Add LoRA", Select([(p.stem, p.stem) for p in models.list("lora")], compact=True,
                                              prompt="pick from models/Lora", id="convert-lora-pick"))
                vaes = [(p.name, str(p)) for p in models.list("vae")]
                yield _row("VAE", Select([("the checkpoint's own", ""), *vaes], allow_blank=False, value="",
                                         id="convert-vae", compact=True))
                yield Static("Core ML", classes="section")
                yield _row("Attention", Select([(a, a) for a in c.ATTENTIONS], value=c.ATTENTIONS[0],
                                               allow_blank=False, id="convert-attention", compact=True,
                                               tooltip="split_einsum: Neural Engine; original: GPU"))
                yield _row("UNet chunks", Input("2", type="integer", id="convert-chunks", compact=True,
                                                tooltip="1 = one Unet.mlpackage; 2 suits iOS and older Macs"))
                yield _row("Quantize", Select(QUANTIZE, value="none", allow_blank=False, id="convert-quantize",
                                              compact=True, tooltip="palettize the UNet's weights"))
                yield _row("Sizes", Input("512x512", id="convert-size", compact=True,
                                          tooltip="WIDTHxHEIGHT; several (512x512,512x768) need target macOS15"))
                yield _row("Target", Select([(t, t) for t in c.TARGETS], value="macOS14", allow_blank=False,
                                            id="convert-target-os", compact=True))
                yield _row("Clip skip", Input("1", type="integer", id="convert-clip-skip", compact=True))
                yield Static("Components", classes="section")
                for name, label in COMPONENT_LABELS.items():
                    yield Checkbox(label, True, id=f"convert-{name}", compact=True, classes="component")
                yield Checkbox("Verify every package against the checkpoint", True, id="convert-verify",
                               compact=True)
                with Horizontal(id="convert-actions"):
                    yield Button("Convert  ctrl+g", id="convert-start", variant="primary")
                    yield Button("Cancel  esc", id="convert-cancel", disabled=True)
            with Vertical(id="convert-status"):
                yield Static("", id="convert-target", markup=False)
                with Horizontal(id="convert-progress-row"):
                    yield ProgressBar(total=1, show_eta=False, id="convert-progress")
                    yield Label("", id="convert-elapsed", markup=False)
                yield DataTable(id="convert-stages", cursor_type="none", show_cursor=False)
                yield Static("Verification", classes="section")
                yield DataTable(id="convert-checks", cursor_type="none", show_cursor=False)
                yield Static("", id="convert-summary", markup=False)
                yield Log(id="convert-log")
        yield Footer()

    def on_mount(self) -> None:
        if self.converter is None:
            return
        self.sub_title = f"bundles go to {self.app.models.folder('coreml')}"
        self.query_one("#convert-stages", DataTable).add_columns("Stage", "State", "Time")
        self.query_one("#convert-checks", DataTable).add_columns(*CHECK_COLUMNS)
        self.set_interval(1.0, self._tick)
        self._show_target()
        self.query_one("#convert-summary", Static).update(
            "ctrl+g converts: stage by stage, then every package is run by the reference executor and compared "
            "with the checkpoint (PSNR). The bundle then appears in the model lists (F2, F4).")

    def on_screen_resume(self) -> None:
        self.catalog_changed()

    def _checkpoints(self) -> list[tuple[str, str]]:
        return [(e.label, str(e.path)) for e in self.app.catalog if e.kind == "checkpoint"]

    def catalog_changed(self) -> None:
        """New family badges, or a checkpoint added: the list follows, the choice stays."""
        if self.converter is None or self._catalog_version == self.app.catalog_version:
            return
        self._catalog_version = self.app.catalog_version
        select = self.query_one("#convert-model", Select)
        current, options = select.value, self._checkpoints()
        select.set_options(options)
        if current is not Select.NULL and any(value == current for _, value in options):
            select.value = current

    # ---- the form ----------------------------------------------------------------------------------

    def _job(self) -> ConversionJob:
        """The form as a conversion job; anything wrong is a UsageError naming its field."""
        from mlsd.session import resolve_loras

        c = self.converter
        model = self.query_one("#convert-model", Select).value
        if model is Select.NULL:
            raise UsageError("No checkpoint selected.", where="Checkpoint field",
                             fix=f"put one in {self.app.models.folder('checkpoint')}, then pick it")
        numbers = {}
        for widget_id, label in (("convert-chunks", "UNet chunks"), ("convert-clip-skip", "Clip skip")):
            text = self.query_one(f"#{widget_id}", Input).value.strip()
            try:
                numbers[widget_id] = int(text)
            except ValueError:
                raise UsageError(f"{label} '{text}' is not a whole number.", where=f"{label} field",
                                 fix=f"type a whole number into the {label} field") from None
        bits = self.query_one("#convert-quantize", Select).value
        components = tuple(name for name in COMPONENT_LABELS if self.query_one(f"#convert-{name}", Checkbox).value)
        options = c.ConvertOptions(
            attention=str(self.query_one("#convert-attention", Select).value), chunks=numbers["convert-chunks"],
            quantize_bits=None if bits == "none" else int(bits),
            sizes=parse_sizes(self.query_one("#convert-size", Input).value), components=components,
            min_target=str(self.query_one("#convert-target-os", Select).value),
            clip_skip=numbers["convert-clip-skip"])
        options.validate()
        text = self.query_one("#convert-loras", Input).value
        loras = resolve_loras(self.app.models, [s.strip() for s in text.split(",") if s.strip()])
        vae = self.query_one("#convert-vae", Select).value
        checkpoint = Path(str(model))
        bundle = c.default_bundle_path(self.app.models.root, checkpoint, [x.path for x in loras], options)
        return ConversionJob(checkpoint, bundle, options, loras, Path(str(vae)) if vae else None,
                             verify=self.query_one("#convert-verify", Checkbox).value)

    def _show_target(self) -> None:
        """Where the bundle will go, kept current while the form changes."""
        if self.running:
            return
        try:
            job = self._job()
        except MlsdError as e:
            text = f"Not ready: {describe_error(e, CONVERT_FIELDS)[1].splitlines()[0]}"
        else:
            reuse = " (exists: parts made the same way are reused)" if (job.bundle / "mlsd.json").is_file() else ""
            text = f"Bundle: {job.bundle}{reuse}"
        self.query_one("#convert-target", Static).update(text)

    def on_input_changed(self, event: Input.Changed) -> None:
        self._show_target()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self._show_target()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "convert-lora-pick" and event.value is not Select.NULL:
            field = self.query_one("#convert-loras", Input)
            field.value = with_lora(field.value, str(event.value))
            event.select.clear()
        self._show_target()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "convert-start":
            self.action_convert()
        elif event.button.id == "convert-cancel":
            self.action_cancel()

    # ---- running -----------------------------------------------------------------------------------

    def action_convert(self) -> None:
        if self.converter is None:
            return
        if self.running:
            self.notify("A conversion is running; escape cancels it.", severity="warning")
            return
        try:
            job = self._job()
        except MlsdError as e:
            self.report(e)
            return
        self._reset(job)
        self._set_running(True)
        self._cancel = threading.Event()
        self.query_one("#convert-target", Static).update(f"Writing {job.bundle}")
        self.query_one(Log).write_line(f"converting {job.checkpoint.name} -> {job.bundle}")
        self._convert(job, self._cancel)

    def action_cancel(self) -> None:
        if self.running and not self._cancel.is_set():
            self._cancel.set()
            self.query_one("#convert-summary", Static).update(
                "Cancelling at the end of the current stage (a stage cannot be interrupted)...")

    @work(thread=True, exclusive=True, group="convert", exit_on_error=False)
    def _convert(self, job: ConversionJob, cancel: threading.Event) -> None:
        worker = get_current_worker()
        run_conversion(job, self.post_message, lambda: cancel.is_set() or worker.is_cancelled)

    def _reset(self, job: ConversionJob) -> None:
        self.result = None
        self._started = {}
        stages = self.query_one("#convert-stages", DataTable)
        stages.clear()
        names = ["load", *job.options.components, *(["verify"] if job.verify else [])]
        for name in names:
            stages.add_row(self._label(name), "waiting", "", key=name)
        self.query_one("#convert-checks", DataTable).clear()
        self.query_one("#convert-progress", ProgressBar).update(total=len(names), progress=0)
        self.query_one("#convert-elapsed", Label).update("")
        self.query_one("#convert-summary", Static).update("")

    @staticmethod
    def _label(stage: str) -> str:
        return STAGE_LABELS.get(stage) or COMPONENT_LABELS.get(stage, stage)

    def _set_running(self, running: bool) -> None:
        self.running = running
        self.query_one("#convert-start", Button).disabled = running
        self.query_one("#convert-cancel", Button).disabled = not running
        for widget in self.query("#convert-form Input, #convert-form Select, #convert-form Checkbox"):
            widget.disabled = running

    def _tick(self) -> None:
        if not self.running or not self._started:
            return
        stage, start = list(self._started.items())[-1]
        self._cell(stage, "Time", format_seconds(time.monotonic() - start))
        total = time.monotonic() - next(iter(self._started.values()))
        self.query_one("#convert-elapsed", Label).update(f"{format_seconds(total)} elapsed")

    def _cell(self, stage: str, column: str, value) -> None:
        table = self.query_one("#convert-stages", DataTable)
        if stage not in table.rows:  # a component carried over from an earlier conversion of this bundle
            table.add_row(self._label(stage), "", "", key=stage)
        columns = {"State": 1, "Time": 2}
        table.update_cell_at((table.get_row_index(stage), columns[column]), value, update_width=True)

    def report(self, error: BaseException) -> None:
        title, text = describe_error(error, CONVERT_FIELDS)
        self.notify(text, title=title, severity="error", timeout=15, markup=False)

    # ---- messages from the worker ------------------------------------------------------------------

    def on_conversion_stage(self, message: Conversion.Stage) -> None:
        log = self.query_one(Log)
        name = message.component
        if message.state == "start":
            self._started[name] = time.monotonic()
            self._cell(name, "State", Text("running", style="bold"))
            self._cell(name, "Time", "0s")
            log.write_line(f"{name}: started")
            return
        self._started.pop(name, None)
        if message.state == "reused":
            self._cell(name, "State", "reused")
            self._cell(name, "Time", "")
            log.write_line(f"{name}: unchanged, reused from the existing bundle")
        else:
            self._cell(name, "State", Text("done", style="green"))
            self._cell(name, "Time", f"{message.seconds:.1f} s")
            log.write_line(f"{name}: done in {message.seconds:.1f} s")
        self.query_one("#convert-progress", ProgressBar).advance(1)

    def on_conversion_done(self, message: Conversion.Done) -> None:
        self._set_running(False)
        self.result = message
        bar = self.query_one("#convert-progress", ProgressBar)
        bar.update(progress=bar.total)
        self.query_one("#convert-elapsed", Label).update(f"{message.seconds:.1f} s in all")
        checks = self.query_one("#convert-checks", DataTable)
        for c in message.checks or []:
            result = Text("ok", style="green") if c.passed else Text("FAIL", style="bold red")
            if not c.gated:
                result = Text("not gated (palettized)", style="yellow")
            checks.add_row(c.component, c.output, f"{c.psnr:.1f}", f"{c.max_abs:.2e}", result)
        where = f"Bundle written: {message.bundle}"
        if message.checks is None:
            summary, severity = f"{where}\nNot verified (the Verify box was off).", "warning"
        else:
            from converters.coreml.verify import GATE_DB

            failed = [c for c in message.checks if not c.passed]
            summary = (f"{where}\nVerification: {len(message.checks) - len(failed)}/{len(message.checks)} outputs "
                       f"at or above {GATE_DB:.0f} dB PSNR against the checkpoint")
            severity = "warning" if failed else "information"
            if failed:
                summary += f"; FAILED: {', '.join(f'{c.component} {c.output}' for c in failed)}"
        self.query_one("#convert-summary", Static).update(summary)
        self.query_one(Log).write_line(f"done in {message.seconds:.1f} s: {message.bundle}")
        self.notify(f"{summary}\nPick it on the Generate screen (F2).", title="Core ML bundle ready",
                    severity=severity, timeout=10, markup=False)
        self.app.refresh_catalog()
        self._show_target()

    def on_conversion_cancelled(self, message: Conversion.Cancelled) -> None:
        self._set_running(False)
        if message.bundle is not None:
            text = f"Cancelled before verification; the bundle was written unverified: {message.bundle}"
            self.app.refresh_catalog()
        else:
            text = f"Cancelled during {self._label(message.stage)}; nothing was written."
        self._cell(message.stage, "State", Text("cancelled", style="yellow"))
        self.query_one("#convert-summary", Static).update(text)
        self.query_one(Log).write_line(text)
        self._show_target()

    def on_conversion_failed(self, message: Conversion.Failed) -> None:
        self._set_running(False)
        title, _ = describe_error(message.error)
        stage = next(reversed(self._started), None)
        if stage:
            self._cell(stage, "State", Text("failed", style="bold red"))
        text = f"Failed: {title}. Nothing was written."
        if stage == "verify":  # the bundle was published before the check ran
            text = f"Verification failed to run ({title}); the bundle was written, unverified."
            self.app.refresh_catalog()
        self.query_one("#convert-summary", Static).update(text)
        self.query_one(Log).write_line(text)
        self.report(message.error)
        self._show_target()
