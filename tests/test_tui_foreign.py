"""The terminal UI with Core ML folders converted elsewhere (here Apple's torch2coreml layout): listed with their
layout, family and size, selected, and run through the reference executor like an mlsd bundle."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("textual")

from PIL import Image  # noqa: E402
from textual.widgets import DataTable, OptionList, Select  # noqa: E402

from mlsd.backends.coreml_backend import CoreMLBackend  # noqa: E402
from mlsd.infotext import GenerationParams, read_image_parameters  # noqa: E402
from mlsd.pipeline.generate import run  # noqa: E402
from mlsd.pipeline.request import GenerationRequest  # noqa: E402
from mlsd.session import ModelCache  # noqa: E402
from tests.generation_helpers import psnr  # noqa: E402
from tests.test_foreign_layouts import APPLE_PARTS, GATE, PREFIX  # noqa: E402
from tests.test_tui_app import FAST, SIZE, _isolated, make_app, notes, pngs, settle, wait_for  # noqa: E402, F401
from tui.messages import Generation  # noqa: E402
from tui.widgets.params import ParamsForm  # noqa: E402

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles("sd1-2chunks", chunks=2)  # the one tests/test_tui_app.py uses: converted once a session


@pytest.fixture(scope="module")
def models(tmp_path_factory, bundle) -> Path:
    """models/Core-ML holding the bundle's packages under Apple's names (no mlsd.json), and an empty folder."""
    root = tmp_path_factory.mktemp("tui-foreign") / "models"
    apple = root / "Core-ML" / "apple-tiny"
    apple.mkdir(parents=True)
    for name, role in [*APPLE_PARTS.items(), ("UnetChunk1", "unet_chunk1"), ("UnetChunk2", "unet_chunk2")]:
        shutil.copytree(bundle / f"{name}.mlpackage", apple / f"{PREFIX}_{role}.mlpackage")
    (root / "Core-ML" / "empty").mkdir()
    (root / "Stable-diffusion").mkdir()
    return root


def test_a_foreign_folder_is_listed_selected_and_generates_the_bundles_image(tmp_path, models, bundle):
    apple = models / "Core-ML" / "apple-tiny"
    app = make_app(tmp_path, models, ModelCache(), prompt=PROMPT)
    seen = []

    async def body():
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            await settle(pilot)
            select = app.screen.query_one("#model", Select)
            labels = [str(option.prompt) for option in select.query_one(OptionList).options]
            select.value = str(apple)
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: any(isinstance(m, Generation.Finished | Generation.Failed) for m in seen))
            await settle(pilot)
            first_notes = notes(app)
            [first_png] = pngs(tmp_path / "outputs")
            app.screen.query_one(ParamsForm).apply(family="sd2")  # the override reaches the backend
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: sum(isinstance(m, Generation.Finished | Generation.Failed)
                                              for m in seen) == 2)
            await settle(pilot)
            await pilot.press("f4")
            await settle(pilot)
            table = app.screen.query_one(DataTable)
            rows = {str(p): [str(c) for c in table.get_row(str(p))] for p in (apple, models / "Core-ML" / "empty")}
            return labels, first_notes, first_png, rows

    labels, first_notes, first_png, rows = asyncio.run(body())
    failures = [m.error for m in seen if isinstance(m, Generation.Failed)]
    assert not failures, failures

    # listed like `mlsd models` lists it: layout, family (assumed: the tiny text width names none), size
    assert "apple-tiny · Core ML apple-packages · SD 1.x 64x64 (family assumed)" in labels
    assert "empty · Core ML · unreadable" in labels
    kind, name, family, hash_cell, detail = rows[str(apple)]
    assert (kind, name, family, hash_cell) == ("Core ML", "apple-tiny", "SD 1.x 64x64 (family assumed)", "")
    assert detail.startswith("apple-packages 64x64 ") and "2 UNet chunks" in detail and "compute unit" in detail
    empty = rows[str(models / "Core-ML" / "empty")]
    assert empty[2] == "unreadable" and empty[4].startswith("No Core ML model here")

    # run as `mlsd generate` runs it on Linux: auto picks the reference executor, and says why
    started = [m for m in seen if isinstance(m, Generation.Started)]
    assert [(m.backend, m.model) for m in started] == [("coreml-reference", apple)] * 2
    assert "converted elsewhere" in started[0].why and "Core ML converted elsewhere: coreml-reference" in first_notes
    params = GenerationParams.from_infotext(read_image_parameters(first_png).raw)
    assert (params.model_name, params.model_hash, params.prompt, params.width, params.steps) == (
        "apple-tiny", None, PROMPT, 64, 2)

    # the same weights as mlsd's own bundle: the same image, computed here without the UI
    request = GenerationRequest(prompt=PROMPT, negative_prompt="", **{**FAST, "cfg_scale": 7.0})
    expected = run(CoreMLBackend(bundle, runner="reference"), request).images[0]
    with Image.open(first_png) as image:
        made = np.asarray(image.convert("RGB"))
    assert psnr(made, expected) >= GATE
    # negative control: Family SD 2.x (another tokenizer, v-prediction assumed) must not pass the same gate
    [sd2_png] = [p for p in pngs(tmp_path / "outputs") if p != first_png]
    with Image.open(sd2_png) as image:
        assert psnr(np.asarray(image.convert("RGB")), expected) < GATE
    records = json.loads((tmp_path / "tui-history.json").read_text())
    assert records[str(sd2_png.resolve())]["form"]["family"] == "sd2"  # reuse restores the override
