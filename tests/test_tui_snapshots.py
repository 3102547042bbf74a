"""Screenshots of the main screens against accepted SVGs in tests/snapshots/ (pytest-textual-snapshot).

After an intended UI change: `pytest tests/test_tui_snapshots.py --snapshot-update`, then look at the SVGs.
Everything on screen is fixed: relative folder names, set file names and times, no generated pixels.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_textual_snapshot = pytest.importorskip("pytest_textual_snapshot")

from PIL import Image  # noqa: E402

from mlsd.infotext import GenerationParams, png_pnginfo  # noqa: E402
from tui.app import create_app  # noqa: E402

SIZE = (140, 50)


class ProjectSnapshots(pytest_textual_snapshot.SVGImageExtension):
    """This project keeps snapshots in tests/snapshots/<test module>/, not syrupy's __snapshots__."""

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(Path(test_location.filepath).parent / "snapshots" / test_location.basename)


@pytest.fixture(autouse=True)
def _fixed_world(tmp_path, monkeypatch, tiny_checkpoints):
    # snap_compare looks the extension up when it is set up; autouse fixtures come first.
    monkeypatch.setattr(pytest_textual_snapshot, "SVGImageExtension", ProjectSnapshots)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLSD_MODELS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # relative "models" and "outputs" print the same on every machine
    src, _ = tiny_checkpoints("sd1")
    checkpoints = Path("models/Stable-diffusion")
    checkpoints.mkdir(parents=True)
    shutil.copy(src, checkpoints / "tiny.safetensors")
    shutil.copy(src.with_suffix(".yaml"), checkpoints / "tiny.yaml")
    (checkpoints / "broken.safetensors").write_bytes(b"")
    Path("models/Core-ML/tiny-split_einsum-512x512").mkdir(parents=True)
    folder = Path("outputs/txt2img-images/2024-01-02")
    folder.mkdir(parents=True)
    text = GenerationParams(prompt="a lighthouse at dusk, (film grain:1.1)", negative_prompt="blurry", steps=20,
                            sampler="DPM++ 2M Karras", cfg_scale=7.0, seed=1234, width=512, height=512,
                            model_hash="0123456789", model_name="tiny").to_infotext()
    for n, colour in enumerate(["slateblue", "darkorange"]):
        path = folder / f"{n:05d}-{1234 + n}.png"
        Image.new("RGB", (64, 64), colour).save(path, pnginfo=png_pnginfo(text))
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))


def _app():
    return create_app(models_dir="models", output_dir="outputs", settings_path=Path("settings.toml"))


async def _settle(pilot) -> None:
    """Until no worker runs: a key press or a finished worker may start another one (a screen's refresh)."""
    idle = 0
    while idle < 2:
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        idle = 0 if any(w.is_running for w in pilot.app.workers) else idle + 1


def _go(*keys):
    async def run_before(pilot) -> None:
        await _settle(pilot)
        await pilot.press(*keys)
        await _settle(pilot)

    return run_before


def test_generate_screen(snap_compare):
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_go())


def test_gallery_screen(snap_compare):
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_go("f3"))


def test_models_screen(snap_compare):
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_go("f4"))


def test_help_screen(snap_compare):
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_go("f1"))


def test_convert_screen(snap_compare):
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_go("f5"))
