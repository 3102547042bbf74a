"""The mlsd terminal UI: one App, a screen per job, and the factory the CLI and the tests use."""

from __future__ import annotations

import os
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.screen import ModalScreen

from mlsd import paths
from mlsd.errors import MlsdError
from mlsd.paths import ModelsDir
from mlsd.session import ModelCache
from tui.catalog import ModelEntry, list_models, scan
from tui.history import History
from tui.messages import Catalog
from tui.screens.convert import ConvertScreen
from tui.screens.gallery import GalleryScreen
from tui.screens.generate import GenerateScreen
from tui.screens.help import HelpScreen
from tui.screens.models import ModelsScreen
from tui.settings import FormValues, SettingsFile
from tui.workers import warm_imports


class MlsdApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "mlsd"
    SCREENS = {"generate": GenerateScreen, "gallery": GalleryScreen, "models": ModelsScreen,
               "convert": ConvertScreen}
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("f2", "show('generate')", "Generate"),
        Binding("f3", "show('gallery')", "Gallery"),
        Binding("f4", "show('models')", "Models"),
        Binding("f5", "show('convert')", "Convert"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, *, models: ModelsDir, output_dir: Path, settings: SettingsFile, initial_form: FormValues,
                 cache: ModelCache | None = None, notes: list[tuple[str, str]] | None = None,
                 remember_models_dir: bool = False):
        super().__init__()
        self.models = models
        self.output_dir = output_dir
        self.settings = settings
        self.initial_form = initial_form
        self.cache = cache or ModelCache()  # one loaded model is kept between generations
        self.notes = notes or []
        self._remember_models_dir = remember_models_dir
        self.history = History(settings.path.with_name("tui-history.json"))
        # --model may name a file outside the models directory: it is listed too, so it can be selected.
        self.extra_models = [Path(initial_form.model)] if initial_form.model else []
        self.catalog: list[ModelEntry] = _listing(models, self.extra_models)  # names now, families later
        self.catalog_version = 0

    def on_mount(self) -> None:
        self.push_screen("generate")
        for title, text in self.notes:
            self.notify(text, title=title, severity="warning", timeout=12, markup=False)
        self._warm_up()
        self._scan_catalog()

    def refresh_catalog(self) -> None:
        """Read the models directory again (after a conversion, say) and describe each model in the
        background; the screens pick the new list up as it arrives and whenever they are shown."""
        self.catalog = _listing(self.models, self.extra_models)
        self.catalog_version += 1
        self._tell_screens()
        self._scan_catalog()

    @work(thread=True, exclusive=True, group="catalog", exit_on_error=False)
    def _scan_catalog(self) -> None:
        self.post_message(Catalog.Scanned(scan(self.models, self.extra_models)))

    def on_catalog_scanned(self, message: Catalog.Scanned) -> None:
        self.catalog = message.entries
        self.catalog_version += 1
        self._tell_screens()

    def _tell_screens(self) -> None:
        for screen in self.screen_stack:
            if hasattr(screen, "catalog_changed") and screen.is_mounted:
                screen.catalog_changed()

    @work(thread=True, group="warm-up", exit_on_error=False)
    def _warm_up(self) -> None:
        # torch and diffusers take seconds to import; doing it now makes the first ctrl+g start sooner.
        warm_imports()

    def on_ready(self) -> None:
        # A blinking cursor makes headless screenshots depend on timing; real terminals keep the blink.
        if self.is_headless:
            for screen in self.screen_stack:
                for widget in screen.query("Input, TextArea"):
                    widget.cursor_blink = False

    async def action_show(self, name: str) -> None:
        while isinstance(self.screen, ModalScreen):
            await self.pop_screen()
        if self.screen is not self.get_screen(name):
            await self.switch_screen(name)

    async def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            await self.pop_screen()
        else:
            await self.push_screen(HelpScreen())

    def reuse(self, params, recorded: dict | None = None) -> None:
        """Gallery -> Generate: fill the form from an image's parameters (and what the TUI recorded when it
        made the image: backend, compute unit, bundle...) and show it."""
        screen = self.get_screen("generate")
        skipped = screen.reuse(params, recorded)
        self.switch_screen("generate")
        text = "Parameters from the image are in the form; ctrl+g makes it again."
        if recorded is None:
            text += " Backend, compute unit and device are not in the image (made outside this TUI): unchanged."
        if skipped:
            text += f" Not found here, left as they were: {', '.join(skipped)}."
        self.notify(text, timeout=8, markup=False)

    def current_model(self) -> str:
        """The model picked on the generate screen right now (the convert screen starts from it)."""
        from textual.widgets import Select

        try:
            value = self.get_screen("generate").query_one("#model", Select).value
        except Exception:  # noqa: BLE001 - not composed yet: fall back to what the app started with
            return self.initial_form.model
        return "" if value is Select.NULL else str(value)

    def remember(self, form: FormValues) -> None:
        try:
            self.settings.save(form=form, output_dir=self.output_dir,
                               models_dir=self.models.root if self._remember_models_dir else None)
        except OSError as e:
            self.notify(f"Could not save settings to {self.settings.path}: {e}", title="Settings not saved",
                        severity="warning", markup=False)


def _listing(models: ModelsDir, extra: list[Path]) -> list[ModelEntry]:
    try:
        return list_models(models, extra)
    except OSError:  # an unreadable folder lists as empty; the models screen says where it looked
        return []


def _models_root(option: str | Path | None, settings: SettingsFile) -> tuple[ModelsDir, bool]:
    """As the CLI resolves it (option, MLSD_MODELS_DIR, settings' models_dir, ./models), plus the folder last
    given to the TUI with --models-dir before falling back to ./models. True: remember this one."""
    if option:
        return ModelsDir(Path(option).expanduser(), "option"), True
    if os.environ.get("MLSD_MODELS_DIR"):
        return ModelsDir(Path(os.environ["MLSD_MODELS_DIR"]).expanduser(), "MLSD_MODELS_DIR"), False
    shared = settings.data.get("models_dir")
    if isinstance(shared, str) and shared:
        return ModelsDir(Path(shared).expanduser(), "settings"), False
    remembered = settings.get_path("models_dir")
    if remembered:
        return ModelsDir(remembered, "last --models-dir"), False
    return ModelsDir(Path("models"), "default"), False


def _initial_model(root: ModelsDir, option: str | None, remembered: str, notes: list) -> str:
    if option:
        errors = []
        for kind in ("checkpoint", "coreml"):
            try:
                return str(root.resolve(option, kind))
            except MlsdError as e:
                errors.append(e)
        notes.append((errors[0].title, errors[0].render()))  # the checkpoint error names the usual folder
    if remembered and Path(remembered).exists():
        return remembered
    checkpoints = root.list("checkpoint")
    return str(checkpoints[0]) if checkpoints else ""


def create_app(models_dir: str | Path | None = None, output_dir: str | Path | None = None, model: str | None = None,
               settings_path: str | Path | None = None, *, cache: ModelCache | None = None) -> MlsdApp:
    """The app as `mlsd tui` starts it; ``cache`` lets tests share one loaded model between apps."""
    settings = SettingsFile(Path(settings_path) if settings_path else paths.settings_path())
    notes: list[tuple[str, str]] = []
    if settings.error:
        notes.append(("Settings not read", f"{settings.error}\nDefaults are used; the file is left unchanged."))
    root, remember_root = _models_root(models_dir, settings)
    outputs = Path(output_dir).expanduser() if output_dir else settings.get_path("output_dir") or Path("outputs")
    form = settings.last_form()
    form.model = _initial_model(root, model, form.model, notes)
    return MlsdApp(models=root, output_dir=outputs, settings=settings, initial_form=form, cache=cache, notes=notes,
                   remember_models_dir=remember_root)
