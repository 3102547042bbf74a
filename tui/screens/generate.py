"""Home screen: prompts, parameters, live preview, progress; ctrl+g generates, escape cancels."""

from __future__ import annotations

import threading

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header
from textual.worker import Worker, get_current_worker

from mlsd.errors import MlsdError
from tui.flags import GENERATE_FIELDS
from tui.messages import Generation, describe_error
from tui.settings import FormValues
from tui.widgets.image_view import ImageView
from tui.widgets.params import ParamsForm
from tui.widgets.progress import GenerationProgress
from tui.widgets.prompt import PromptArea
from tui.workers import GenerationJob, run_generation


class GenerateScreen(Screen):
    AUTO_FOCUS = "#prompt-text"
    BINDINGS = [
        Binding("ctrl+g", "generate", "Generate", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self) -> None:
        super().__init__(id="generate-screen")
        self.last_seed: int | None = None
        self._cancel = threading.Event()
        self._worker: Worker | None = None
        self._catalog_version = -1

    def compose(self) -> ComposeResult:
        app = self.app
        form: FormValues = app.initial_form
        self._catalog_version = app.catalog_version
        yield Header()
        with Horizontal(id="generate-main"):
            with Vertical(id="generate-left"):
                yield PromptArea("Prompt", text=form.prompt, id="prompt",
                                 placeholder="what the image shows: a (red:1.2) fox <lora:name:0.8>")
                yield PromptArea("Negative prompt", text=form.negative_prompt, id="negative",
                                 placeholder="what to avoid")
                yield ImageView("No image yet: type a prompt, then ctrl+g.", id="image")
                yield GenerationProgress(id="progress")
                with Horizontal(id="actions"):
                    yield Button("Generate  ctrl+g", id="generate", variant="primary")
                    yield Button("Cancel  esc", id="cancel", disabled=True)
            yield ParamsForm(form, app.catalog, app.models.list("lora"),
                             app.models.list("vae"), id="params")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"models: {self.app.models.root}  ·  outputs: {self.app.output_dir}"

    def on_screen_resume(self) -> None:
        self.catalog_changed()

    def catalog_changed(self) -> None:
        """The app's model list changed (families described, a bundle converted): show it, keep the choice."""
        if self._catalog_version != self.app.catalog_version:
            self._catalog_version = self.app.catalog_version
            self.query_one(ParamsForm).set_models(self.app.catalog)

    @property
    def generating(self) -> bool:
        return self._worker is not None and self._worker.is_running

    # ---- actions ---------------------------------------------------------------------------------

    def form_values(self) -> FormValues:
        values = self.query_one(ParamsForm).values()
        values.prompt = self.query_one("#prompt", PromptArea).text
        values.negative_prompt = self.query_one("#negative", PromptArea).text
        return values

    def action_generate(self) -> None:
        if self.generating:
            self.notify("An image is being made; escape cancels it.", severity="warning")
            return
        try:
            values = self.form_values()
        except MlsdError as e:
            self.report(e)
            return
        self.app.remember(values)
        self._cancel = threading.Event()
        self.query_one(GenerationProgress).start(values.steps * values.batch_count)
        self._set_running(True)
        self._worker = self._generate(GenerationJob(values, self.app.models, self.app.output_dir,
                                                     self.app.history), self._cancel)

    def action_cancel(self) -> None:
        if self.generating:
            # Only the event: the sampler sees it within a step and the worker ends on its own, so
            # nothing is left running behind a finished-looking worker.
            self._cancel.set()
            self.query_one(GenerationProgress).set_status("Cancelling...")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "generate":
            self.action_generate()
        elif event.button.id == "cancel":
            self.action_cancel()

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, job: GenerationJob, cancel: threading.Event) -> None:
        worker = get_current_worker()
        run_generation(job, self.app.cache, self.post_message, cancel, lambda: worker.is_cancelled)

    # ---- messages from the workers ---------------------------------------------------------------

    def on_generation_started(self, message: Generation.Started) -> None:
        progress = self.query_one(GenerationProgress)
        progress.backend = message.backend
        progress.set_status(f"Loading {message.model.name} on {message.backend} ({message.why})...")
        if (message.model / "mlsd.json").is_file() or (message.model.is_dir() and message.backend != "torch"):
            # a Core ML folder: where it runs is a choice worth saying
            title = "Core ML bundle" if (message.model / "mlsd.json").is_file() else "Core ML converted elsewhere"
            self.notify(f"{message.backend}: {message.why}", title=title, timeout=6, markup=False)

    def on_generation_preview(self, message: Generation.Preview) -> None:
        self.query_one(ImageView).show(message.image, f"preview · step {message.step}/{message.total}")
        self.query_one(GenerationProgress).step(message.step, message.total, message.it_per_s, message.eta,
                                                message.batch, message.batch_count)

    def on_generation_finished(self, message: Generation.Finished) -> None:
        self._set_running(False)
        if message.seeds:
            self.last_seed = message.seeds[0]
        shown = message.grid or (message.paths[0] if message.paths else None)
        self.query_one(ImageView).show(message.image, str(shown or ""))
        count = f"{len(message.paths)} images, " if len(message.paths) > 1 else ""
        seed = f", seed {message.seeds[0]}" if message.seeds else ""
        self.query_one(GenerationProgress).finish(
            f"Saved {message.grid or message.paths[0]}  ({count}{message.seconds:.1f} s{seed})")

    def on_generation_cancelled(self, message: Generation.Cancelled) -> None:
        self._set_running(False)
        self.query_one(GenerationProgress).finish(
            f"Cancelled after {message.step} of {message.total} steps; nothing saved.", complete=False)

    def on_generation_failed(self, message: Generation.Failed) -> None:
        self._set_running(False)
        title, _ = describe_error(message.error)
        self.query_one(GenerationProgress).finish(f"Failed: {title}. Nothing saved.", complete=False)
        self.report(message.error)

    def report(self, error: BaseException) -> None:
        title, text = describe_error(error, GENERATE_FIELDS)
        self.notify(text, title=title, severity="error", timeout=12, markup=False)

    def _set_running(self, running: bool) -> None:
        self.query_one("#generate", Button).disabled = running
        self.query_one("#cancel", Button).disabled = not running

    # ---- reuse from the gallery ------------------------------------------------------------------

    def reuse(self, params, recorded: dict | None = None) -> list[str]:
        """Fill the form from an image's GenerationParams, plus the fields the TUI recorded when it made it
        (backend, compute unit, device, the bundle it ran...). Returns what could not be restored here."""
        self.query_one("#prompt", PromptArea).text = params.prompt  # carries the LoRAs as <lora:...> tags
        self.query_one("#negative", PromptArea).text = params.negative_prompt
        form = self.query_one(ParamsForm)
        values = {"seed": params.seed, "steps": params.steps, "sampler": params.sampler,
                  "cfg_scale": params.cfg_scale, "width": params.width, "height": params.height,
                  "clip_skip": params.clip_skip, "loras": "", "init_image": "", "mask": ""}
        if params.denoising_strength is not None:
            values["strength"] = params.denoising_strength
        values["vae"] = params.vae_name or ""
        model = form.model_for_name(params.model_name, params.model_hash) if params.model_name else None
        values.update(recorded or {})
        if not form.has_choice("model", values.get("model")):  # the bundle or file it ran is gone
            values["model"] = model
        skipped = form.apply(**values)
        self.query_one("#prompt-text").focus()
        return skipped
