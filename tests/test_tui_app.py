"""The terminal UI driven as a person would: Pilot types, presses keys, and we look at files and screens."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable, Input, Select, Static  # noqa: E402

from mlsd.infotext import GenerationParams, png_pnginfo, read_image_parameters  # noqa: E402
from mlsd.session import ModelCache  # noqa: E402
from tui.app import create_app  # noqa: E402
from tui.flags import GENERATE_FIELDS  # noqa: E402
from tui.messages import Generation  # noqa: E402
from tui.settings import FormValues, SettingsFile  # noqa: E402
from tui.widgets.params import ParamsForm  # noqa: E402
from tui.widgets.progress import GenerationProgress  # noqa: E402
from tui.widgets.prompt import PromptArea  # noqa: E402

SIZE = (140, 50)
FAST = {"steps": 2, "width": 64, "height": 64, "seed": 42, "sampler": "Euler"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Hash cache and settings in tmp; one torch thread (the cores are shared and small models gain nothing)."""
    import torch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("MLSD_MODELS_DIR", raising=False)
    monkeypatch.setenv("MLSD_SETTINGS", str(tmp_path / "settings.toml"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoints) -> Path:
    """models/ in the A1111 layout with the tiny SD1 checkpoint and a Core ML bundle folder for it."""
    src, _ = tiny_checkpoints("sd1")
    root = tmp_path_factory.mktemp("tui-models") / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(src, root / "Stable-diffusion" / "tiny.safetensors")
    shutil.copy(src.with_suffix(".yaml"), root / "Stable-diffusion" / "tiny.yaml")
    (root / "Core-ML" / "tiny-split_einsum-512x512").mkdir(parents=True)
    (root / "Lora").mkdir()
    return root


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()  # the tiny model loads once for the whole module


def write_settings(path: Path, **form) -> Path:
    SettingsFile(path).save(form=FormValues(**{**FAST, **form}))
    return path


def make_app(tmp_path, models, cache, model=None, **form):
    settings = write_settings(tmp_path / "settings.toml", **form)
    return keep_notes(create_app(models_dir=models, output_dir=tmp_path / "outputs", settings_path=settings,
                                 cache=cache, model=model))


async def settle(pilot) -> None:
    """Until no worker runs: a key press or a finished worker may start another one (a screen's refresh)."""
    idle = 0
    while idle < 2:
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        idle = 0 if any(w.is_running for w in pilot.app.workers) else idle + 1


async def wait_for(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await pilot.pause(0.05)


def pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png")) if root.exists() else []


def keep_notes(app):
    """Every notification as "title: message", kept after its toast times out (a slow machine may take
    longer than the timeout to reach the assertion)."""
    app.sent_notes = []
    notify = app.notify

    def note(message, *, title="", **kw):
        app.sent_notes.append(f"{title}: {message}")
        return notify(message, title=title, **kw)

    app.notify = note
    return app


def notes(app) -> str:
    return "\n".join(app.sent_notes)


def clear_notes(app) -> None:
    app.sent_notes.clear()


def test_type_prompts_generate_and_save_like_mlsd_generate(tmp_path, models, cache):
    app = make_app(tmp_path, models, cache)
    seen = []

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            assert app.focused.id == "prompt-text"  # typing starts in the prompt
            await pilot.press(*"a red fox")
            await pilot.press("tab")
            assert app.focused.id == "negative-text"
            await pilot.press(*"blurry")
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Generation.Finished) for m in seen))
            await settle(pilot)
            seed = app.screen.query_one("#seed", Input)
            await pilot.click("#seed-random")
            randomised = seed.value
            await pilot.click("#seed-last")
            return app.screen.query_one(GenerationProgress).status, randomised, seed.value

    status, randomised, reused = asyncio.run(body())
    assert randomised != "42" and reused == "42"
    [png] = pngs(tmp_path / "outputs")
    assert png.parent.parent.name == "txt2img-images" and png.name == "00000-42.png"
    params = GenerationParams.from_infotext(read_image_parameters(png).raw)
    assert (params.prompt, params.negative_prompt, params.seed, params.steps) == ("a red fox", "blurry", 42, 2)
    assert (params.width, params.height, params.sampler, params.model_name) == (64, 64, "Euler", "tiny")
    assert params.model_hash  # stamped as `mlsd generate` stamps it
    previews = [m for m in seen if isinstance(m, Generation.Preview)]
    assert previews and previews[-1].total == 2 and previews[0].image.size == (64, 64)
    assert str(png) in status and "seed 42" in status
    last = SettingsFile(tmp_path / "settings.toml").last_form()  # the form is remembered
    assert (last.prompt, last.negative_prompt, last.steps) == ("a red fox", "blurry", 2)


def test_escape_cancels_within_a_step_and_saves_nothing(tmp_path, models, cache):
    app = make_app(tmp_path, models, cache, steps=400, prompt="a slow fox")
    seen = []

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Generation.Preview) for m in seen))
            await pilot.press("escape")
            await wait_for(pilot, lambda: any(isinstance(m, Generation.Cancelled) for m in seen))
            await settle(pilot)
            return app.screen.query_one(GenerationProgress).status

    status = asyncio.run(body())
    [cancelled] = [m for m in seen if isinstance(m, Generation.Cancelled)]
    assert 1 <= cancelled.step < 400 and cancelled.total == 400
    assert not any(isinstance(m, Generation.Finished) for m in seen)
    assert pngs(tmp_path / "outputs") == []
    assert status.startswith("Cancelled after")


def test_gallery_lists_outputs_and_reuse_fills_the_form(tmp_path, models, cache):
    from PIL import Image

    folder = tmp_path / "outputs" / "txt2img-images" / "2024-01-02"
    folder.mkdir(parents=True)
    text = GenerationParams(prompt="a (blue:1.2) owl", negative_prompt="lowres", steps=7, sampler="DDIM",
                            cfg_scale=5.5, seed=1234, width=96, height=128, model_name="tiny").to_infotext()
    Image.new("RGB", (96, 128), "navy").save(folder / "00000-1234.png", pnginfo=png_pnginfo(text))
    Image.new("RGB", (8, 8), "red").save(folder / "00001-5.png")  # no parameters; older, listed second
    old = time.time() - 100
    import os

    os.utime(folder / "00001-5.png", (old, old))
    app = make_app(tmp_path, models, cache)

    async def body():
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("f3")
            await settle(pilot)
            gallery = app.screen
            assert [p.name for p in gallery.paths] == ["00000-1234.png", "00001-5.png"]
            assert str(folder) in str(gallery.query_one("#gallery-folder", Static).content)
            assert "a (blue:1.2) owl" in str(gallery.query_one("#gallery-params", Static).content)
            await pilot.press("r")
            await settle(pilot)
            screen = app.screen
            form = {i: screen.query_one(f"#{i}", Input).value for i in ("steps", "cfg", "seed", "width", "height")}
            return (screen.id, screen.query_one("#prompt", PromptArea).text,
                    screen.query_one("#negative", PromptArea).text, form,
                    screen.query_one("#sampler", Select).value)

    screen_id, prompt, negative, form, sampler = asyncio.run(body())
    assert screen_id == "generate-screen"
    assert (prompt, negative, sampler) == ("a (blue:1.2) owl", "lowres", "DDIM")
    assert form == {"steps": "7", "cfg": "5.5", "seed": "1234", "width": "96", "height": "128"}


def test_bad_input_shows_an_error_and_the_app_keeps_running(tmp_path, models, cache):
    broken = tmp_path / "broken-models"
    (broken / "Stable-diffusion").mkdir(parents=True)
    (broken / "Stable-diffusion" / "broken.safetensors").write_bytes(b"")
    settings = write_settings(tmp_path / "settings.toml", prompt="a fox")
    app = keep_notes(create_app(models_dir=broken, output_dir=tmp_path / "outputs", settings_path=settings,
                                cache=cache))

    async def body():
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("ctrl+g")
            await settle(pilot)
            first = notes(app), app.screen.query_one(GenerationProgress).status
            clear_notes(app)
            # the listing already said so: the select's badge marks the file unreadable
            label = str(app.screen.query_one("#model", Select).selection)
            return first, label

    (note, status), label = asyncio.run(body())
    assert "Cannot read file" in note and "empty (0 bytes)" in note and "broken.safetensors" in note
    assert status.startswith("Failed")
    assert label.endswith("broken.safetensors")
    assert pngs(tmp_path / "outputs") == []


MISTAKES = [
    ("init-image", "does-not-exist.png", "Init image not found"),
    ("loras", "no-such-lora:0.8", "No lora named 'no-such-lora'"),
    ("steps", "", "Steps '' is not a whole number"),
    # mlsd says "use --backend torch" to the CLI; the TUI names its form field
    ("backend", "coreml", "Backend coreml needs a Core ML bundle"),
    ("clip-skip", "0", "clip skip 0 < 1"),
    ("model", "Core-ML/tiny-split_einsum-512x512", "No Core ML model here (no mlsd.json"),  # keep last
]


def test_each_mistake_is_named_in_a_notification(tmp_path, models, cache):
    app = make_app(tmp_path, models, cache, prompt="a fox")

    async def body():
        found = []
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            screen = app.screen
            for field, value, _ in MISTAKES:
                if field == "model":
                    screen.query_one("#model", Select).value = str(models / value)
                elif field == "backend":
                    screen.query_one("#backend", Select).value = value
                else:
                    widget = screen.query_one(f"#{field}", Input)
                    before, widget.value = widget.value, value
                await pilot.press("ctrl+g")
                await settle(pilot)
                found.append((notes(app), app.screen.id))
                clear_notes(app)
                if field == "backend":
                    screen.query_one("#backend", Select).value = "auto"
                elif field != "model":
                    widget.value = before
        return found

    found = asyncio.run(body())
    for (note, screen_id), (_, _, expected) in zip(found, MISTAKES, strict=True):
        assert expected in note and screen_id == "generate-screen"
        # no flag of `mlsd generate`: the advice names the form's fields (--models-dir is `mlsd tui`'s own)
        assert not [p for f in GENERATE_FIELDS for p in f.split("/") if re.search(rf"{p}(?![\w-])", note)], note
    by_field = {field: note for (note, _), (field, _, _) in zip(found, MISTAKES, strict=True)}
    backend_note = by_field["backend"]
    assert "where: Backend field" not in backend_note  # this one names the file it is about
    assert "set the Backend field to torch" in backend_note and "(Convert screen, F5)" in backend_note
    assert "where: Clip skip field" in by_field["clip-skip"]
    assert pngs(tmp_path / "outputs") == []


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles("sd1-2chunks", chunks=2)  # 64x64, converted from tiny_checkpoints("sd1")


def test_a_core_ml_bundle_generates_and_names_its_source_checkpoint(tmp_path, models, bundle):
    import json

    app = make_app(tmp_path, models, ModelCache(), model=str(bundle), backend="coreml-reference",
                   prompt="a red fox")
    seen = []

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            assert app.screen.query_one("#model", Select).value == str(bundle)
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Generation.Finished | Generation.Failed) for m in seen))
            await settle(pilot)
            first = notes(app), app.screen.query_one(GenerationProgress).status
            clear_notes(app)
            # the limits a bundle has reach the user as notifications too
            app.screen.query_one("#prompt", PromptArea).text = ", ".join(["a very detailed red fox"] * 20)
            await pilot.press("ctrl+g")
            await settle(pilot)
            too_long = notes(app), app.screen.id
            clear_notes(app)
            app.screen.query_one("#prompt", PromptArea).text = "a red fox"
            app.screen.query_one(ParamsForm).apply(width=128, height=128)
            await pilot.press("ctrl+g")
            await settle(pilot)
            return first, too_long, notes(app)

    (note, status), (too_long, screen_id), wrong_size = asyncio.run(body())
    failures = [m.error for m in seen if isinstance(m, Generation.Failed)]
    assert any(isinstance(m, Generation.Finished) for m in seen) and len(failures) == 2, failures
    [started, *_] = [m for m in seen if isinstance(m, Generation.Started)]
    assert (started.backend, started.why) == ("coreml-reference", "asked for")
    assert "coreml-reference: asked for" in note
    [png] = pngs(tmp_path / "outputs")
    assert str(png) in status
    source = json.loads((bundle / "mlsd.json").read_text())["source"]
    params = GenerationParams.from_infotext(read_image_parameters(png).raw)
    assert (params.model_name, params.model_hash) == (Path(source["path"]).stem, source["a1111_hash"])
    assert (params.prompt, params.width, params.height, params.steps) == ("a red fox", 64, 64, 2)
    assert "75 tokens" in too_long and screen_id == "generate-screen"
    assert "runs 64x64 images" in wrong_size


def test_reuse_restores_the_bundle_backend_and_compute_unit_it_ran_on(tmp_path, models, bundle):
    from PIL import Image

    app = make_app(tmp_path, models, ModelCache(), model=str(bundle), backend="coreml-reference",
                   compute_unit="cpu", device="cpu", prompt="a red fox", seed=77)
    seen = []
    checkpoint = str(models / "Stable-diffusion" / "tiny.safetensors")

    def form_of(screen) -> dict:
        values = screen.query_one(ParamsForm).values()
        return {k: getattr(values, k) for k in ("model", "backend", "compute_unit", "device", "seed", "clip_skip")}

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Generation.Finished | Generation.Failed) for m in seen))
            await settle(pilot)
            [png] = pngs(tmp_path / "outputs")
            changed = dict(backend="torch", compute_unit="all", device="auto", model=checkpoint, seed=5, clip_skip=2)
            app.screen.query_one(ParamsForm).apply(**changed)
            await pilot.press("f3")
            await settle(pilot)
            shown = str(app.screen.query_one("#gallery-params", Static).content)
            await pilot.press("r")
            await settle(pilot)
            restored, note = form_of(app.screen), notes(app)
            clear_notes(app)
            # Negative control: the same file name now holds another image (other parameters): its record
            # must not apply, so backend and compute unit stay as the form has them.
            text = read_image_parameters(png).raw.replace("Seed: 77", "Seed: 78")
            Image.new("RGB", (64, 64), "red").save(png, pnginfo=png_pnginfo(text))
            app.screen.query_one(ParamsForm).apply(**changed)
            await pilot.press("f3")
            await settle(pilot)
            await pilot.press("r")
            await settle(pilot)
            return png, shown, restored, note, form_of(app.screen), notes(app)

    png, shown, restored, note, unrecorded, other_note = asyncio.run(body())
    assert not [m for m in seen if isinstance(m, Generation.Failed)]
    params = GenerationParams.from_infotext(read_image_parameters(png).raw)
    assert params.model_name != bundle.name  # the PNG names the source checkpoint, as `mlsd generate` writes it
    assert "backend coreml-reference, compute unit cpu" in shown
    assert restored == {"model": str(bundle), "backend": "coreml-reference", "compute_unit": "cpu", "device": "cpu",
                        "seed": 77, "clip_skip": 1}
    assert "not in the image" not in note
    assert unrecorded == {"model": checkpoint, "backend": "torch", "compute_unit": "all", "device": "auto",
                          "seed": 78, "clip_skip": 1}
    assert "Backend, compute unit and device are not in the image" in other_note


def test_loras_with_a_bundle_are_refused_in_a_notification(tmp_path, models, bundle):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")  # refused before any file is read
    app = make_app(tmp_path, models, ModelCache(), model=str(bundle), loras=f"{lora}:0.8", prompt="a fox")

    async def body():
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("ctrl+g")
            await settle(pilot)
            return ([(n.severity, n.message) for n in app._notifications],
                    app.screen.query_one(GenerationProgress).status, app.screen.id)

    found, status, screen_id = asyncio.run(body())
    assert [s for s, m in found if "merged into its weights" in m] == ["error"]
    assert status.startswith("Failed") and screen_id == "generate-screen"
    assert pngs(tmp_path / "outputs") == []


def test_token_counter_follows_typing_in_75_token_chunks(tmp_path, models, cache):
    elsewhere = tmp_path / "elsewhere" / "mine.safetensors"  # --model PATH outside the models folder
    elsewhere.parent.mkdir()
    shutil.copy(models / "Stable-diffusion" / "tiny.safetensors", elsewhere)
    app = make_app(tmp_path, models, cache, model=str(elsewhere))

    async def body():
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            model = app.screen.query_one("#model", Select)
            assert model.value == str(elsewhere)
            area = app.screen.query_one("#prompt", PromptArea)
            counts = [area.count]
            await pilot.press(*"a red fox")
            await settle(pilot)
            counts.append(area.count)
            area.text_area.insert(", a red fox" * 20)  # 20 x 4 more tokens
            await settle(pilot)
            counts.append(area.count)
            return counts

    assert asyncio.run(body()) == ["0/75", "3/75", "83/150"]


def test_help_and_models_screens(tmp_path, models, cache):
    from mlsd.hashes import model_short_hash

    app = make_app(tmp_path, models, cache)

    async def body():
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            order = []
            for _ in range(3):  # prompt -> negative -> Generate -> the first parameter (not the column)
                await pilot.press("tab")
                order.append(app.focused.id)
            assert order == ["negative-text", "generate", "model"]
            await pilot.press("f1")
            help_text = type(app.screen).__name__
            await pilot.press("escape")
            back = app.screen.id
            await pilot.press("f4")
            await settle(pilot)
            table = app.screen.query_one(DataTable)
            row = [str(c) for c in table.get_row(str(models / "Stable-diffusion" / "tiny.safetensors"))]
            bundle_row = [str(c) for c in table.get_row(str(models / "Core-ML" / "tiny-split_einsum-512x512"))]
            return help_text, back, row, bundle_row

    help_name, back, row, bundle_row = asyncio.run(body())
    assert help_name == "HelpScreen" and back == "generate-screen"
    assert row == ["checkpoint", "tiny", "SD 1.x", model_short_hash(models / "Stable-diffusion" / "tiny.safetensors"),
                   "tiny-split_einsum-512x512"]
    # an empty folder in Core-ML/ is no Core ML model: said in the row, as `mlsd models` says it
    assert bundle_row[:3] == ["Core ML", "tiny-split_einsum-512x512", "unreadable"]
    assert bundle_row[4].startswith("No Core ML model here")


def test_convert_screen_says_when_the_converter_is_missing(tmp_path, models, cache, monkeypatch):
    monkeypatch.setattr("tui.screens.convert.load_converter", lambda: (None, "No module named 'coremltools'"))
    app = make_app(tmp_path, models, cache)

    async def body():
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("f5")
            await settle(pilot)
            return str(app.screen.query_one("#convert-unavailable", Static).content)

    text = asyncio.run(body())
    assert "not available in this build" in text and "coremltools" in text
