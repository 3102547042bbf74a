"""The generation parameters column: model, sampler, numbers, LoRAs, VAE, device, img2img inputs."""

from __future__ import annotations

import random
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static

from mlsd.errors import UsageError
from mlsd.pipeline.samplers import sampler_names
from mlsd.session import BACKENDS
from tui.catalog import ModelEntry
from tui.settings import FormValues

MAX_SEED = 2**32 - 1  # mlsd.pipeline.generate.MAX_SEED; importing that module would load torch at startup
SIZE_PRESETS = ("512x512", "512x768", "768x512", "768x768", "640x640", "1024x1024", "256x256", "64x64")
# mlsd.backends.coreml_backend.COMPUTE_UNITS; importing that module would load torch at startup
COMPUTE_UNITS = ("auto", "ane", "gpu", "cpu", "all")
DEVICES = ("auto", "cuda", "mps", "cpu")
# mlsd.families.FAMILIES, for Core ML folders converted elsewhere ("": what the model's specs say)
FAMILIES = (("from the model", ""), ("SD 1.x", "sd1"), ("SD 2.x", "sd2"))
# Input id -> (FormValues field, label shown in errors, parser)
NUMBERS = {
    "steps": ("steps", "Steps", int), "cfg": ("cfg_scale", "CFG scale", float), "seed": ("seed", "Seed", int),
    "width": ("width", "Width", int), "height": ("height", "Height", int),
    "batch-count": ("batch_count", "Batch count", int), "batch-size": ("batch_size", "Batch size", int),
    "strength": ("strength", "Strength", float), "clip-skip": ("clip_skip", "Clip skip", int),
}  # fmt: skip
TEXTS = {"loras": "loras", "init-image": "init_image", "mask": "mask"}
SELECTS = (("model", "model"), ("family", "family"), ("sampler", "sampler"), ("vae", "vae"), ("backend", "backend"),
           ("compute-unit", "compute_unit"), ("device", "device"))  # (Select id, FormValues field)
SELECT_LABELS = {"model": "Model", "family": "Family", "sampler": "Sampler", "vae": "VAE", "backend": "Backend",
                 "compute-unit": "Compute", "device": "Device"}


def _row(label: str, *widgets, classes: str = "") -> Horizontal:
    return Horizontal(Label(label, classes="field-label"), *widgets, classes=f"field {classes}".strip())


def _options(values) -> list[tuple[str, str]]:
    return [(v, v) for v in values]


def with_lora(listing: str, name: str) -> str:
    """A "NAME:WEIGHT, ..." field with `name` appended at weight 1, unless it is listed already."""
    present = [item.strip() for item in listing.split(",") if item.strip()]
    if any(item.split(":")[0] == name for item in present):
        return listing
    return ", ".join([*present, f"{name}:1"])

class ParamsForm(VerticalScroll, can_focus=False):
    """Reads as FormValues and takes FormValues back (settings, gallery reuse).

    Not a focus stop itself: Tab goes from the buttons straight to the first field (a focused field
    scrolls into view anyway)."""

    def __init__(self, values: FormValues, entries: list[ModelEntry], loras: list[Path], vaes: list[Path],
                 id: str | None = None):
        super().__init__(id=id)
        self._initial = values
        self._entries = entries
        self._loras = loras
        self._vaes = vaes

    def compose(self) -> ComposeResult:
        v = self._initial
        models = [(e.label, str(e.path)) for e in self._entries]
        samplers = sampler_names()
        yield Static("Model", classes="section")
        yield Select(models, prompt="(no models found)", allow_blank=True, id="model", compact=True,
                     value=v.model if v.model in {m[1] for m in models} else Select.NULL)
        families = {value for _, value in FAMILIES}
        yield _row("Family", Select(FAMILIES, allow_blank=False, id="family", compact=True,
                                    value=v.family if v.family in families else "",
                                    tooltip="Core ML folders converted elsewhere whose text width names no family "
                                            "(their listing says \"family assumed\"); others say it themselves"))
        yield Static("Sampling", classes="section")
        yield _row("Sampler", Select(_options(samplers), allow_blank=False, id="sampler", compact=True,
                                     value=v.sampler if v.sampler in samplers else samplers[0]))
        yield _row("Steps", Input(str(v.steps), type="integer", id="steps", compact=True))
        yield _row("CFG scale", Input(f"{v.cfg_scale:g}", type="number", id="cfg", compact=True))
        yield _row("Clip skip", Input(str(v.clip_skip), type="integer", id="clip-skip", compact=True,
                                      tooltip="1 = the text encoder's last layer, 2 = the one before it"))
        yield _row("Seed", Input(str(v.seed), type="integer", id="seed", compact=True),
                   Button("Random", id="seed-random", compact=True, tooltip="a new random seed"),
                   Button("Last", id="seed-last", compact=True, tooltip="the seed of the last image"))
        yield Static("Size", classes="section")
        yield _row("Preset", Select(_options(SIZE_PRESETS), prompt="custom", id="size-preset", compact=True,
                                    value=self._preset(v.width, v.height)))
        yield _row("Width", Input(str(v.width), type="integer", id="width", compact=True))
        yield _row("Height", Input(str(v.height), type="integer", id="height", compact=True))
        yield _row("Batch count", Input(str(v.batch_count), type="integer", id="batch-count", compact=True))
        yield _row("Batch size", Input(str(v.batch_size), type="integer", id="batch-size", compact=True))
        yield Static("LoRAs and VAE", classes="section")
        yield _row("LoRAs", Input(v.loras, placeholder="name:0.8, other:0.5", id="loras", compact=True))
        yield _row("Add LoRA", Select(_options(p.stem for p in self._loras), prompt="pick from models/Lora",
                                      id="lora-pick", compact=True))
        vae_names = [p.name for p in self._vaes]
        yield _row("VAE", Select([("Automatic", ""), *_options(vae_names)], allow_blank=False, id="vae",
                                 compact=True, value=v.vae if v.vae in vae_names else ""))
        yield Static("Device", classes="section")
        yield _row("Backend", Select(_options(BACKENDS), allow_blank=False, id="backend", compact=True,
                                     value=v.backend if v.backend in BACKENDS else "auto",
                                     tooltip="auto: a Core ML bundle runs on Core ML on macOS, elsewhere on its "
                                             "source checkpoint (or the reference executor, as Core ML folders "
                                             "converted elsewhere do)"))
        yield _row("Compute", Select(_options(COMPUTE_UNITS), allow_blank=False, id="compute-unit",
                                          compact=True, tooltip="Core ML only: where a bundle runs",
                                          value=v.compute_unit if v.compute_unit in COMPUTE_UNITS else "auto"))
        yield _row("Device", Select(_options(DEVICES), allow_blank=False, id="device", compact=True,
                                    value=v.device if v.device in DEVICES else "auto"))
        yield Static("img2img / inpaint", classes="section")
        yield _row("Init image", Input(v.init_image, placeholder="path (empty: txt2img)", id="init-image",
                                       compact=True))
        yield _row("Strength", Input(f"{v.strength:g}", type="number", id="strength", compact=True))
        yield _row("Mask", Input(v.mask, placeholder="path (white = repaint)", id="mask", compact=True))

    @staticmethod
    def _preset(width: int, height: int):
        name = f"{width}x{height}"
        return name if name in SIZE_PRESETS else Select.NULL

    # ---- reading and writing ----------------------------------------------------------------------

    def values(self) -> FormValues:
        """The form as FormValues; a number that does not parse is a UsageError naming its field."""
        out = FormValues()
        for widget_id, (attr, label, parse) in NUMBERS.items():
            text = self.query_one(f"#{widget_id}", Input).value.strip()
            try:
                setattr(out, attr, parse(text))
            except ValueError:
                kind = "a whole number" if parse is int else "a number"
                raise UsageError(f"{label} '{text}' is not {kind}.", where=label,
                                 fix=f"type {kind} into the {label} field") from None
        for widget_id, attr in TEXTS.items():
            setattr(out, attr, self.query_one(f"#{widget_id}", Input).value.strip())
        for widget_id, attr in SELECTS:
            value = self.query_one(f"#{widget_id}", Select).value
            setattr(out, attr, "" if value is Select.NULL else str(value))
        return out

    def apply(self, **values) -> list[str]:
        """Set fields by FormValues name. A choice this form does not offer (a model or VAE that is not in
        the models directory, say) is left as it was; the returned labels say which."""
        skipped = []
        for widget_id, (attr, _, _) in NUMBERS.items():
            if values.get(attr) is not None:
                value = values[attr]
                self.query_one(f"#{widget_id}", Input).value = f"{value:g}" if isinstance(value, float) else str(value)
        for widget_id, attr in TEXTS.items():
            if values.get(attr) is not None:
                self.query_one(f"#{widget_id}", Input).value = str(values[attr])
        for widget_id, attr in SELECTS:
            value = values.get(attr)
            if value is None:
                continue
            if self.has_choice(widget_id, value):
                self.query_one(f"#{widget_id}", Select).value = value
            else:
                skipped.append(f"{SELECT_LABELS[widget_id]} {value}")
        return skipped

    def has_choice(self, widget_id: str, value) -> bool:
        return value is not None and str(value) in self._choices(widget_id)

    def _choices(self, widget_id: str) -> set[str]:
        return {"model": {str(e.path) for e in self._entries}, "family": {value for _, value in FAMILIES},
                "sampler": set(sampler_names()),
                "vae": {"", *(p.name for p in self._vaes)}, "backend": set(BACKENDS),
                "compute-unit": set(COMPUTE_UNITS), "device": set(DEVICES)}[widget_id]

    def set_models(self, entries: list[ModelEntry]) -> None:
        """New labels (family badges arrive after a background scan); the selection stays."""
        select = self.query_one("#model", Select)
        current = select.value
        self._entries = entries
        select.set_options([(e.label, str(e.path)) for e in entries])
        if current is not Select.NULL and any(str(e.path) == current for e in entries):
            select.value = current

    def model_for_name(self, name: str, short_hash: str | None = None) -> str | None:
        """The option value for an infotext "Model" name (a checkpoint stem); where several files share the
        name, the one whose A1111 hash is the image's (read from the hash cache or computed)."""
        named = [e for e in self._entries if e.kind == "checkpoint" and e.name == name]
        if len(named) > 1 and short_hash:
            from mlsd.hashes import model_short_hash

            for e in named:
                try:
                    if e.path.is_file() and model_short_hash(e.path) == short_hash:
                        return str(e.path)
                except OSError:
                    continue
        return str(named[0].path) if named else None

    # ---- interactions -----------------------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "seed-random":
            self.query_one("#seed", Input).value = str(random.randint(0, MAX_SEED))
        elif event.button.id == "seed-last":
            last = getattr(self.screen, "last_seed", None)
            if last is None:
                self.notify("No image made yet in this session.", severity="warning")
            else:
                self.query_one("#seed", Input).value = str(last)
        else:
            return
        event.stop()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "size-preset" and event.value is not Select.NULL:
            width, height = str(event.value).split("x")
            self.query_one("#width", Input).value = width
            self.query_one("#height", Input).value = height
        elif event.select.id == "lora-pick" and event.value is not Select.NULL:
            field = self.query_one("#loras", Input)
            field.value = with_lora(field.value, str(event.value))
            event.select.clear()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id in ("width", "height"):
            preset = self._preset(self.query_one("#width", Input).value.strip(),
                                  self.query_one("#height", Input).value.strip())
            select = self.query_one("#size-preset", Select)
            if select.value != preset:
                select.value = preset
