"""TUI pieces that need no running app: settings file, latent preview, image renderers, CLI wiring."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("textual")

from PIL import Image  # noqa: E402

from tui.settings import FormValues, SettingsFile, dumps  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---- settings.toml ------------------------------------------------------------------------------


def test_toml_writer_round_trips_through_tomllib():
    import datetime as dt

    data = {"models_dir": "/m", "odd key": 1.5e-7, "flag": True, "big": float("inf"), "day": dt.date(2024, 1, 2),
            "items": [1, 'q"uote', {"inline": 2}],
            "tui": {"last": {"prompt": 'a "fox"\nline two \\ é \x01', "steps": 3}, "output_dir": "out"}}
    assert tomllib.loads(dumps(data)) == data


def test_save_keeps_other_keys_and_restores_the_form(tmp_path):
    path = tmp_path / "cfg" / "settings.toml"
    path.parent.mkdir()
    path.write_text('models_dir = "/shared/models"\n[other]\nx = 1\n', encoding="utf-8")
    form = FormValues(prompt="a fox, (red:1.2)", negative_prompt="blurry", steps=9, cfg_scale=4.5, seed=7)
    assert SettingsFile(path).save(form=form, output_dir=tmp_path / "out")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["models_dir"] == "/shared/models" and data["other"] == {"x": 1}
    again = SettingsFile(path)
    assert again.last_form() == form and again.get_path("output_dir") == tmp_path / "out"
    assert not list(path.parent.glob(".*tmp*"))  # the temp file was moved into place


def test_a_broken_settings_file_is_reported_and_never_overwritten(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text("this is = = not toml", encoding="utf-8")
    settings = SettingsFile(path)
    assert settings.error and settings.last_form() == FormValues()
    assert not settings.save(form=FormValues(prompt="x"))
    assert path.read_text(encoding="utf-8") == "this is = = not toml"


def test_form_values_drop_wrong_types_and_unknown_keys():
    form = FormValues.from_dict({"steps": "many", "cfg_scale": 6, "seed": 5, "what": 1, "prompt": ["x"]})
    assert (form.steps, form.cfg_scale, form.seed, form.prompt) == (20, 6.0, 5, "")


def test_create_app_resolves_folders_and_reports_an_unknown_model(tmp_path, monkeypatch):
    from tui.app import create_app

    monkeypatch.delenv("MLSD_MODELS_DIR", raising=False)
    path = tmp_path / "settings.toml"
    path.write_text(f'models_dir = "{tmp_path / "shared"}"\n[tui]\noutput_dir = "{tmp_path / "out"}"\n',
                    encoding="utf-8")
    app = create_app(settings_path=path, model="nope")
    assert app.models.root == tmp_path / "shared" and app.models.source == "settings"
    assert app.output_dir == tmp_path / "out"
    [(title, text)] = app.notes
    assert title == "Model not found" and "No checkpoint named 'nope'" in text
    app = create_app(models_dir=tmp_path / "mine", output_dir=tmp_path / "o2", settings_path=path)
    assert (app.models.root, app.models.source, app.output_dir) == (tmp_path / "mine", "option", tmp_path / "o2")


# ---- latent preview -----------------------------------------------------------------------------


def test_latent_preview_maps_channels_to_rgb_and_upscales():
    import torch

    from tui.preview import LATENT_RGB_FACTORS, latent_preview

    latents = torch.zeros(2, 4, 8, 12)
    latents[0, 0] = 1.0  # channel 0 alone: its row of the factor table, as a colour
    image = latent_preview(latents, (96, 64))
    assert image.size == (96, 64) and image.mode == "RGB"
    expected = tuple(round((f + 1) * 127.5) for f in LATENT_RGB_FACTORS[0])
    assert image.getpixel((48, 32)) == expected
    assert latent_preview(torch.zeros(1, 4, 128, 128), (1024, 1024)).size == (512, 512)  # capped
    assert latent_preview(torch.zeros(1, 16, 4, 4)).size == (32, 32)  # other latent spaces: grey, no crash


def test_a_flood_of_previews_collapses_into_the_newest():
    from tui.messages import Generation

    image = Image.new("RGB", (8, 8))
    first, second = Generation.Preview(1, 10, image), Generation.Preview(2, 10, image)
    assert first.can_replace(second)
    assert not first.can_replace(Generation.Finished([], 1.0))
    assert Generation.Preview(2, 10, image, batch=0, batch_count=2, it_per_s=2.0).eta == 9.0  # 8 + 10 steps left
    assert not Generation.Preview.bubble  # for the screen whose worker posted it


def test_max_seed_matches_the_pipeline():
    from mlsd.pipeline.generate import MAX_SEED
    from tui.widgets import params

    assert params.MAX_SEED == MAX_SEED


# ---- mlsd's CLI advice in the form's words -------------------------------------------------------

FLAG_CASES = [
    # (core text, screen, what the TUI shows)
    ("convert it first (mlsd convert), or use --backend torch", "generate",
     "convert it first (Convert screen, F5), or set the Backend field to torch"),
    ("--backend coreml needs macOS (Core ML cannot run on this OS).", "generate",
     "Backend coreml needs macOS (Core ML cannot run on this OS)."),
    ("raise --strength or --steps", "generate", "raise the Strength field or the Steps field"),
    ("pass --init-image", "generate", "fill in the Init image field"),
    ("pass --model NAME|PATH (see `mlsd models`)", "generate", "fill in the Model field (see the Models screen, F4)"),
    ("set the root with --models-dir or MLSD_MODELS_DIR", "generate",
     "set the root with --models-dir or MLSD_MODELS_DIR"),  # a flag `mlsd tui` has too: kept
    ("--chunks 9 is outside 1-8.", "convert", "UNet chunks 9 is outside 1-8."),
    ("add --min-target macOS15, or one size", "convert", "set the Target field to macOS15, or one size"),
    ("--width/--height 100 is not a multiple of 64", "generate", "the Width/Height field 100 is not a multiple of 64"),
]


@pytest.mark.parametrize(("text", "screen", "shown"), FLAG_CASES)
def test_cli_flags_in_errors_read_as_form_fields(text, screen, shown):
    from tui.flags import CONVERT_FIELDS, GENERATE_FIELDS, in_form_terms

    assert in_form_terms(text, GENERATE_FIELDS if screen == "generate" else CONVERT_FIELDS) == shown


def test_an_error_is_rewritten_for_the_tui_and_left_alone_for_the_cli():
    from mlsd.errors import UsageError
    from tui.flags import GENERATE_FIELDS
    from tui.messages import describe_error

    error = UsageError("--backend coreml needs macOS.", where="--backend", fix="use --backend coreml-reference")
    title, text = describe_error(error, GENERATE_FIELDS)
    assert title == "Invalid option"
    assert text == ("Backend coreml needs macOS.\n  where: Backend field\n"
                    "  fix:   set the Backend field to coreml-reference")
    assert describe_error(error)[1] == error.render() and "--backend coreml-reference" in error.render()


# ---- what the TUI records beside the PNGs it writes -----------------------------------------------


def test_history_applies_only_to_the_image_it_was_recorded_for(tmp_path, monkeypatch):
    from tui import history as history_module
    from tui.history import History

    history = History(tmp_path / "cfg" / "tui-history.json")
    form = FormValues(model="/m/bundle", backend="coreml-reference", compute_unit="cpu", device="cpu", seed=5)
    history.record([(tmp_path / "a.png", "a fox\nSeed: 5"), (tmp_path / "b.png", "an owl\nSeed: 6")], form,
                   ran_on="coreml-reference")
    found = history.lookup(tmp_path / "a.png", "a fox\nSeed: 5")
    assert found["backend"] == "coreml-reference" and found["compute_unit"] == "cpu" and found["model"] == "/m/bundle"
    assert found["ran_on"] == "coreml-reference"
    assert "seed" not in found  # the PNG says that itself
    assert history.lookup(tmp_path / "a.png", "a fox\nSeed: 6") is None  # same name, another image
    assert history.lookup(tmp_path / "c.png", "a fox\nSeed: 5") is None
    monkeypatch.setattr(history_module, "MAX_RECORDS", 2)
    history.record([(tmp_path / "c.png", "c")], form)  # the oldest record goes
    assert history.lookup(tmp_path / "a.png", "a fox\nSeed: 5") is None
    assert history.lookup(tmp_path / "c.png", "c") is not None
    (tmp_path / "cfg" / "tui-history.json").write_text("{not json", encoding="utf-8")
    assert history.lookup(tmp_path / "c.png", "c") is None  # a damaged file means no record, never an error


# ---- textual-image renderers (Pilot has no TTY, so the app itself falls back to text) --------------


def _two_band_image() -> Image.Image:
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    image.paste((0, 0, 255), (0, 2, 4, 4))  # top half red, bottom half blue
    return image


def _render(renderable) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=20, height=10,
                      legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


def test_halfcell_renderer_draws_coloured_half_blocks():
    from textual_image.renderable.halfcell import Image as HalfcellImage

    out = _render(HalfcellImage(_two_band_image(), width=4, height=2))
    assert out.count("▀") == 8
    assert "38;2;255;0;0" in out and "48;2;255;0;0" in out  # red over red in the top row
    assert "38;2;0;0;255" in out and "48;2;0;0;255" in out  # blue over blue below


def test_sixel_renderer_emits_a_dcs_sixel_sequence():
    from textual_image.renderable.sixel import Image as SixelImage

    out = _render(SixelImage(_two_band_image(), width=4, height=2))
    start = out.index("\x1bP")
    assert "q" in out[start:start + 16] and out.index("\x1b\\", start) > start  # DCS ... q <data> ST
    assert "#" in out[start:]  # colour registers


def test_kitty_renderer_sends_apc_graphics_and_places_unicode_placeholders(monkeypatch):
    from textual_image.renderable.tgp import Image as TGPImage

    terminal = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", terminal)  # the image data goes straight to the terminal
    out = _render(TGPImage(_two_band_image(), width=4, height=2))
    sent = terminal.getvalue()
    assert sent.startswith("\x1b_G") and "f=100" in sent and "a=p" in sent and sent.endswith("\x1b\\")
    assert out.count(chr(0x10EEEE)) == 8  # one placeholder per cell


# ---- CLI wiring ---------------------------------------------------------------------------------


def test_cli_registers_tui_with_its_options():
    from tui.cli import add_parser, cmd_tui

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub, lambda p: p.add_argument("--models-dir"))
    args = parser.parse_args(["tui", "--model", "tiny", "--output-dir", "out", "--models-dir", "m"])
    assert (args.model, args.output_dir, args.models_dir, args.func) == ("tiny", Path("out"), "m", cmd_tui)


def test_registering_the_subcommand_loads_no_textual():
    code = ("import sys, argparse, tui.cli\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_image', 'torch')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
