"""The Convert screen (F5) runs real conversions of the tiny checkpoint under Pilot: stage progress,
verification, the new bundle in the model lists; a cancel and a bad file leave nothing behind."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import numpy as np

pytest.importorskip("textual")
pytest.importorskip("coremltools")

from textual.widgets import Checkbox, DataTable, Input, Select, Static  # noqa: E402

from mlsd.session import ModelCache  # noqa: E402
from tests.test_tui_app import (  # noqa: E402, F401
    SIZE,
    _isolated,
    clear_notes,
    keep_notes,
    notes,
    settle,
    wait_for,
    write_settings,
)
from tui.app import create_app  # noqa: E402
from tui.messages import Conversion  # noqa: E402


@pytest.fixture
def models(tmp_path, tiny_checkpoints) -> Path:
    """A models folder of this test's own (conversions write into its Core-ML/)."""
    src, _ = tiny_checkpoints("sd1")
    root = tmp_path / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(src, root / "Stable-diffusion" / "tiny.safetensors")
    shutil.copy(src.with_suffix(".yaml"), root / "Stable-diffusion" / "tiny.yaml")
    return root


def make_app(tmp_path, models):
    settings = write_settings(tmp_path / "settings.toml")
    return keep_notes(create_app(models_dir=models, output_dir=tmp_path / "outputs", settings_path=settings,
                                 cache=ModelCache()))


async def fill_convert_form(pilot, components: tuple[str, ...], checkpoint: Path | None = None) -> None:
    """F5, then small options: one chunk, 64x64 (what the tiny model is for), only ``components``."""
    await pilot.press("f5")
    await settle(pilot)
    screen = pilot.app.screen
    if checkpoint is not None:
        screen.query_one("#convert-model", Select).value = str(checkpoint)
    screen.query_one("#convert-size", Input).value = "64x64"
    screen.query_one("#convert-chunks", Input).value = "1"
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        box = screen.query_one(f"#convert-{name}", Checkbox)
        if box.value != (name in components):
            await pilot.click(f"#convert-{name}")  # as a person would: the mouse toggles the box
    await pilot.pause()


def conversion_messages(seen) -> list:
    return [m for m in seen if isinstance(m, Conversion.Stage | Conversion.Done | Conversion.Cancelled
                                          | Conversion.Failed)]


def text_encoder_lora(models: Path) -> Path:
    """A kohya LoRA on two text-encoder layers, in models/Lora (the text encoder is the cheap part to convert)."""
    import torch

    from mlsd.checkpoints.load import load_model
    from tests.lora_fixtures import kohya_stem, lora_piece, write_lora

    base = load_model(models / "Stable-diffusion" / "tiny.safetensors")
    g = torch.Generator().manual_seed(11)
    entries = {}
    for name in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"):
        entries[kohya_stem("lora_te_", f"text_model.{name}")] = lora_piece(base.text_encoder.get_submodule(name), g,
                                                                            rank=4, alpha=4.0)
    (models / "Lora").mkdir(exist_ok=True)
    return write_lora(models / "Lora" / "style.safetensors", entries)


def text_encoder_outputs(package: Path | None, checkpoint: Path) -> np.ndarray:
    """last_hidden_state for a fixed prompt: from the package (reference executor) or the plain checkpoint."""
    import numpy as np
    import torch

    from converters.coreml.components import TextEncoderWrapper
    from mlsd.checkpoints.load import load_model
    from mlsd.coreml import Executor

    model = load_model(checkpoint)
    ids = model.tokenizer(["a lighthouse at dusk"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    if package is not None:
        return np.asarray(Executor(package).run({"input_ids": ids.float().numpy()})["last_hidden_state"], np.float32)
    with torch.no_grad():
        return TextEncoderWrapper(model.text_encoder)(ids)[0].numpy()


def test_convert_verifies_and_the_bundle_appears_in_the_model_lists(tmp_path, models):
    import numpy as np

    lora = text_encoder_lora(models)
    app = make_app(tmp_path, models)
    seen = []
    bundle = models / "Core-ML" / "tiny-style-split_einsum-64x64"

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            await fill_convert_form(pilot, ("text_encoder",))
            screen = app.screen
            screen.query_one("#convert-lora-pick", Select).value = "style"  # the picker writes "style:1"
            await pilot.pause()
            loras = screen.query_one("#convert-loras", Input)
            picked = loras.value
            loras.focus()
            await pilot.press("end", "backspace", *"0.5")
            target = str(screen.query_one("#convert-target", Static).content)
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Conversion.Done | Conversion.Failed) for m in seen),
                           timeout=300)
            await settle(pilot)
            table = screen.query_one("#convert-checks", DataTable)
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            stages = screen.query_one("#convert-stages", DataTable)
            states = {str(stages.get_row_at(i)[0]): str(stages.get_row_at(i)[1]) for i in range(stages.row_count)}
            summary = str(screen.query_one("#convert-summary", Static).content)
            await pilot.press("f2")
            await settle(pilot)
            models_in_form = [value for _, value in app.screen.query_one("#model", Select)._options]
            await pilot.press("f4")
            await settle(pilot)
            listed = [str(k.value) for k in app.screen.query_one(DataTable).rows]
            return picked, target, rows, states, summary, models_in_form, listed

    picked, target, rows, states, summary, models_in_form, listed = asyncio.run(body())
    assert picked == "style:1"
    failed = [m.error for m in seen if isinstance(m, Conversion.Failed)]
    assert not failed, failed
    progress = [(m.component, m.state) for m in conversion_messages(seen) if isinstance(m, Conversion.Stage)]
    assert progress == [("load", "start"), ("load", "done"), ("text_encoder", "start"), ("text_encoder", "done"),
                        ("verify", "start"), ("verify", "done")]
    [done] = [m for m in seen if isinstance(m, Conversion.Done)]
    assert done.bundle == bundle and str(bundle) in target and str(bundle) in summary
    assert set(done.timings) == {"load", "text_encoder", "verify"} and all(t > 0 for t in done.timings.values())
    # What the screen shows is what the converter recorded in the bundle's manifest.
    manifest = json.loads((bundle / "mlsd.json").read_text())
    assert list(manifest["components"]) == ["text_encoder"] and (bundle / "TextEncoder.mlpackage").is_dir()
    assert manifest["options"]["chunks"] == 1 and manifest["options"]["sizes"] == ["64x64"]
    [merged] = manifest["loras"]
    assert (Path(merged["path"]), merged["unet_weight"]) == (lora, 0.5)
    recorded = manifest["verification"]["results"]
    assert [[r["component"], r["output"], f"{r['psnr']:.1f}", f"{r['max_abs']:.2e}"] for r in recorded] == \
        [row[:4] for row in rows]
    assert [row[4] for row in rows] == ["ok", "ok"] and all(r["passed"] for r in recorded)
    assert "2/2 outputs at or above 35 dB" in summary
    assert states == {"load checkpoint": "done", "Text encoder": "done", "verify (reference executor)": "done"}
    assert str(bundle) in models_in_form and str(bundle) in listed
    assert not [p for p in (models / "Core-ML").iterdir() if p != bundle]  # no work folder left behind
    # Negative control: the LoRA really is in the converted weights (the package differs from the plain
    # checkpoint by far more than the verified conversion error).
    ours = text_encoder_outputs(bundle / "TextEncoder.mlpackage", models / "Stable-diffusion" / "tiny.safetensors")
    plain = text_encoder_outputs(None, models / "Stable-diffusion" / "tiny.safetensors")
    assert float(np.abs(ours - plain).max()) > 20 * recorded[0]["max_abs"]


def test_escape_cancels_at_the_next_stage_and_publishes_nothing(tmp_path, models):
    app = make_app(tmp_path, models)
    seen = []

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            await fill_convert_form(pilot, ("text_encoder", "vae_encoder"))
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Conversion.Stage) and m.component == "text_encoder"
                                              for m in seen), timeout=120)
            await pilot.press("escape")
            await wait_for(pilot, lambda: any(isinstance(m, Conversion.Cancelled | Conversion.Done) for m in seen),
                           timeout=300)
            await settle(pilot)
            return str(app.screen.query_one("#convert-summary", Static).content), app.screen.running

    summary, running = asyncio.run(body())
    [cancelled] = [m for m in seen if isinstance(m, Conversion.Cancelled)]
    assert cancelled.stage == "text_encoder" and cancelled.bundle is None
    stages = [m.component for m in seen if isinstance(m, Conversion.Stage)]
    assert "vae_encoder" not in stages and "verify" not in stages  # stopped at the stage boundary
    assert "nothing was written" in summary and not running
    leftovers = list((models / "Core-ML").iterdir()) if (models / "Core-ML").exists() else []
    assert leftovers == []  # neither the bundle nor the converter's hidden work folder


def test_a_bad_checkpoint_or_option_is_a_notification_not_a_crash(tmp_path, models):
    broken = models / "Stable-diffusion" / "broken.safetensors"
    broken.write_bytes(b"")
    app = make_app(tmp_path, models)
    seen = []

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            await fill_convert_form(pilot, ("text_encoder",), checkpoint=broken)
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Conversion.Failed | Conversion.Done) for m in seen))
            await settle(pilot)
            first = notes(app), str(app.screen.query_one("#convert-summary", Static).content), app.screen.id
            clear_notes(app)
            app.screen.query_one("#convert-model", Select).value = str(models / "Stable-diffusion" /
                                                                       "tiny.safetensors")
            app.screen.query_one("#convert-chunks", Input).value = "9"
            await pilot.press("ctrl+g")
            await settle(pilot)
            return first, notes(app), app.screen.id, app.screen.running

    (note, summary, screen_id), chunks_note, screen_after, running = asyncio.run(body())
    assert "Cannot read file" in note and "empty (0 bytes)" in note and "broken.safetensors" in note
    assert summary.startswith("Failed") and screen_id == "convert-screen"
    # The converter's own message names CLI flags; here it names the form's field instead.
    assert "UNet chunks 9 is outside 1-8" in chunks_note and "UNet chunks field" in chunks_note
    assert "--chunks" not in chunks_note
    assert screen_after == "convert-screen" and not running
    assert not (models / "Core-ML").exists() or list((models / "Core-ML").iterdir()) == []
    assert len([m for m in seen if isinstance(m, Conversion.Failed)]) == 1  # the option never reached a worker
