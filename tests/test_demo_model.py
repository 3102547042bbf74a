"""The built-in demo model follows prompts: semantic checks on images drawn through mlsd's own pipeline.

Images are judged by mlsd.demo.shapes' classifiers (border colour, two-means foreground, template IoU),
which share nothing with the model. Each comparison carries its own control: the opposite prompt, the
other strength, the unmasked half, weight 0. The same checks run on the PyTorch backend and on the
Core ML bundle converted from the shipped file, evaluated by the MIL reference executor.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlsd.demo import shapes
from mlsd.demo.run import shipped_files
from mlsd.pipeline.generate import run
from mlsd.pipeline.request import GenerationRequest

STEPS = 12
SIZE = shapes.SIZE


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def torch_backend():
    from mlsd.session import ModelKey, load_backend

    return load_backend(ModelKey(shipped_files()[0], device="cpu"))


@pytest.fixture(scope="session")
def demo_bundles(tmp_path_factory):
    """The shipped model (and the model with its LoRA merged) converted at 64x64, once per session."""
    from converters.cli import quiet_coremltools
    from converters.coreml.convert import ConvertOptions, convert_checkpoint
    from mlsd.session import LoraChoice

    quiet_coremltools()
    checkpoint, _, lora = shipped_files()
    root = tmp_path_factory.mktemp("demo-bundles")
    cache = {}

    def make(name: str):
        if name not in cache:
            loras = [LoraChoice(lora, 1.0)] if name == "green" else []
            components = ("text_encoder", "unet", "vae_decoder") if loras else (
                "text_encoder", "unet", "vae_decoder", "vae_encoder")
            options = ConvertOptions(sizes=[(SIZE, SIZE)], chunks=1, components=components)
            cache[name] = convert_checkpoint(checkpoint, root / name, options=options, loras=loras)
        return cache[name]

    return make


@pytest.fixture(scope="module")
def coreml_backend(demo_bundles):
    from mlsd.backends.coreml_backend import CoreMLBackend

    return CoreMLBackend(demo_bundles("base"), runner="reference")


@pytest.fixture(params=["torch", "coreml"])
def backend(request):
    return request.getfixturevalue(f"{request.param}_backend")


def draw(backend, prompt: str, negative: str = "", *, n: int = 4, seed: int = 1, cfg: float = 7.0,
         steps: int = STEPS, sampler: str = "DPM++ 2M Karras", **kw) -> list[Image.Image]:
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg, seed=seed,
                                sampler=sampler, width=SIZE, height=SIZE, batch_size=n, **kw)
    return run(backend, request).images


def affinity(images, colour: str) -> float:
    """Mean fraction of pixels nearest ``colour`` in the palette (an independent, pixel-level measure)."""
    return float(np.mean([shapes.colour_affinity(im, colour) for im in images]))


def mean_redness(images) -> float:
    return float(np.mean([shapes.redness(im) for im in images]))


def backgrounds(images) -> list[str]:
    return [shapes.read_image(im).background for im in images]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float64)


# ---- the shipped files ------------------------------------------------------------------------------------


def test_shipped_files_are_an_a1111_checkpoint_with_sidecar_and_a_kohya_lora():
    import yaml
    from safetensors import safe_open

    from mlsd.checkpoints.read import read_weights
    from mlsd.lora import read_lora_file

    checkpoint, sidecar, lora = shipped_files()
    assert checkpoint.stat().st_size + lora.stat().st_size <= 25 * 2**20
    with safe_open(str(checkpoint), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} >= {"model", "first_stage_model", "cond_stage_model"}
    assert yaml.safe_load(sidecar.read_text())["model"]["params"]["unet_config"]["params"]["context_dim"] == 64
    parsed = read_lora_file(lora)
    assert parsed.formats == ("lora",) and parsed.summary.network_module == "networks.lora"
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in read_weights(lora).tensors)


def test_recorded_metrics_describe_the_shipped_files_and_meet_the_targets():
    import json

    from mlsd.hashes import file_sha256

    checkpoint, _, lora = shipped_files()
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    assert metrics["setup"]["steps"] == 20 and metrics["setup"]["cfg_scale"] == 7.0
    assert metrics["checkpoint_sha256"] == file_sha256(checkpoint, cache=False)
    assert metrics["lora_sha256"] == file_sha256(lora, cache=False)
    base = metrics["base"]
    assert base["images"] >= 128
    assert base["colour_accuracy"] >= 0.9 and base["shape_accuracy"] >= 0.7 and base["background_accuracy"] >= 0.9
    assert metrics["lora_green_weight_1"]["green_fraction"] >= 0.8 > base["green_fraction"]
    training = json.loads((checkpoint.parent / "training.json").read_text())
    assert training["seconds"]["total"] <= 60 * 60


# Every colour once, the shapes and backgrounds in rotation: the eval's prompts, two seeds each.
ADHERENCE = [(colour, shapes.SHAPES[i % 4], [b for b in shapes.BACKGROUNDS if b != colour][i % 5])
             for i, colour in enumerate(shapes.COLOURS)]


@pytest.fixture(scope="module")
def adherence_readings():
    """{(backend, cfg): [(reading, colour, shape, background)]} for the 8 ADHERENCE prompts x 2 seeds."""
    return {}


def _adherence(backend, cache: dict, name: str, cfg: float = 7.0):
    if (name, cfg) not in cache:
        cache[name, cfg] = [(shapes.read_image(im), c, s, b) for i, (c, s, b) in enumerate(ADHERENCE)
                            for im in draw(backend, f"a {c} {s} on a {b} background", n=2, seed=100 + 2 * i,
                                           steps=20, cfg=cfg)]
    return cache[name, cfg]


def _exact(readings) -> int:
    return sum((r.colour, r.shape, r.background) == (c, s, b) for r, c, s, b in readings)


def test_the_prompted_colour_shape_and_background_are_drawn(backend, request, adherence_readings):
    readings = _adherence(backend, adherence_readings, request.node.callspec.params["backend"])
    n = len(readings)
    assert _exact(readings) >= 0.6 * n
    colour = sum(r.colour == c for r, c, _, _ in readings)
    shape = sum(r.shape == s for r, _, s, _ in readings)
    background = sum(r.background == b for r, _, _, b in readings)
    assert colour >= 0.85 * n and shape >= 0.65 * n and background == n, (colour, shape, background)
    # control: the same images judged against the next prompt's words
    shifted = [ADHERENCE[(i // 2 + 1) % len(ADHERENCE)] for i in range(n)]
    assert sum(r.colour == c for (r, *_), (c, _, _) in zip(readings, shifted)) <= 0.2 * n
    assert sum(r.shape == s for (r, *_), (_, s, _) in zip(readings, shifted)) <= 0.35 * n


def test_core_ml_draws_what_pytorch_draws(torch_backend, coreml_backend, adherence_readings):
    ours = _adherence(coreml_backend, adherence_readings, "coreml")
    ref = _adherence(torch_backend, adherence_readings, "torch")
    same = sum((a.colour, a.shape, a.background) == (b.colour, b.shape, b.background)
               for (a, *_), (b, *_) in zip(ours, ref))
    assert same >= len(ref) - 2


def test_demo_installs_the_shipped_model_once_and_replaces_a_stale_one(tmp_path):
    from mlsd.demo.run import DEMO_NAME, ensure_demo_model

    path = ensure_demo_model(tmp_path)
    assert path == tmp_path / "Stable-diffusion" / f"{DEMO_NAME}.safetensors"
    assert path.read_bytes() == shipped_files()[0].read_bytes()
    assert path.with_suffix(".yaml").read_bytes() == shipped_files()[1].read_bytes()
    assert (tmp_path / "Lora" / shipped_files()[2].name).read_bytes() == shipped_files()[2].read_bytes()
    stamp = path.stat().st_mtime_ns
    ensure_demo_model(tmp_path)
    assert path.stat().st_mtime_ns == stamp  # identical: not copied again
    path.write_bytes(b"an older demo model")
    ensure_demo_model(tmp_path)
    assert path.read_bytes() == shipped_files()[0].read_bytes()
    assert not list(tmp_path.rglob(".*partial*"))


# ---- prompts, negative prompts, guidance --------------------------------------------------------------------
# Each check has its control: the opposite prompt, no negative prompt, CFG 1, the next prompt's words.


def test_the_prompted_background_colour_is_drawn(backend):
    blue = draw(backend, "a circle on a blue background")
    yellow = draw(backend, "a circle on a yellow background")
    assert affinity(blue, "blue") > affinity(yellow, "blue") + 0.4
    assert affinity(yellow, "yellow") > affinity(blue, "yellow") + 0.4
    assert backgrounds(blue).count("blue") >= 3 and backgrounds(yellow).count("yellow") >= 3


def test_red_prompts_are_redder_than_blue_prompts(backend):
    red = draw(backend, "a red square on a white background", n=6)
    blue = draw(backend, "a blue square on a white background", n=6)
    assert mean_redness(red) > mean_redness(blue) + 0.05
    assert affinity(blue, "blue") > affinity(red, "blue")


def test_negative_prompt_steers_away_from_what_it_names(backend):
    plain = draw(backend, "a circle", n=6, seed=20)
    no_yellow = draw(backend, "a circle", "a yellow background", n=6, seed=20)
    assert affinity(no_yellow, "yellow") < affinity(plain, "yellow") - 0.1
    assert backgrounds(no_yellow).count("yellow") < max(backgrounds(plain).count("yellow"), 1)
    on_white = draw(backend, "a circle on a white background", n=6, seed=20)
    not_red = draw(backend, "a circle on a white background", "red", n=6, seed=20)
    assert mean_redness(not_red) < mean_redness(on_white) - 0.03


def test_guidance_7_follows_the_prompt_more_than_guidance_1(backend, request, adherence_readings):
    """The model follows its prompts even unguided (CFG 1 samples the conditional model); guidance adds the
    rest: on torch, 16/16 images exactly as prompted at CFG 7 against 13/16 at CFG 1."""
    name = request.node.callspec.params["backend"]
    guided = _exact(_adherence(backend, adherence_readings, name, cfg=7.0))
    plain = _exact(_adherence(backend, adherence_readings, name, cfg=1.0))
    assert guided > plain and guided >= 0.85 * len(ADHERENCE) * 2, (guided, plain)


# ---- samplers ---------------------------------------------------------------------------------------------


def test_every_sampler_reaches_the_prompted_colour_and_shape(backend):
    """20 steps each; PLMS gets 50: at 15-20 it leaves half its images unfinished, as diffusers' PNDM does
    (mlsd's samplers draw diffusers' images: tests/test_generation_parity.py), and as A1111 users know it."""
    from mlsd.pipeline.samplers import SAMPLERS

    misses = []
    for name in SAMPLERS:
        images = draw(backend, "a yellow square on a blue background", n=4, seed=3, sampler=name,
                      steps=50 if name == "PLMS" else 20)
        readings = [(r.colour, r.shape, r.background) for r in map(shapes.read_image, images)]
        if readings.count(("yellow", "square", "blue")) < 3:
            misses.append((name, readings))
    assert not misses


# ---- LoRA -------------------------------------------------------------------------------------------------


def test_lora_turns_shapes_green_at_weight_1_and_is_the_base_at_weight_0(torch_backend):
    from mlsd.session import LoraChoice, ModelKey, load_backend

    checkpoint, _, lora = shipped_files()
    prompt = "a red circle on a white background"
    base = draw(torch_backend, prompt)
    zero = draw(load_backend(ModelKey(checkpoint, loras=(LoraChoice(lora, 0.0),), device="cpu")), prompt)
    green = draw(load_backend(ModelKey(checkpoint, loras=(LoraChoice(lora, 1.0),), device="cpu")), prompt)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(base, zero))
    assert affinity(green, "green") > affinity(base, "green") + 0.05
    assert colours(green).count("green") > colours(base).count("green")


def test_lora_merged_into_a_core_ml_bundle_turns_shapes_green(demo_bundles, torch_backend):
    from mlsd.backends.coreml_backend import CoreMLBackend

    backend = CoreMLBackend(demo_bundles("green"), runner="reference")
    prompt = "a red circle on a white background"
    assert affinity(draw(backend, prompt), "green") > affinity(draw(torch_backend, prompt), "green") + 0.05


def colours(images) -> list[str | None]:
    return [shapes.read_image(im).colour for im in images]


# ---- img2img and inpainting ---------------------------------------------------------------------------------


def _init_image() -> Image.Image:
    return shapes.render(shapes.Scene("square", "red", "white", 32, 32, 18))


def test_img2img_low_strength_keeps_the_image_and_high_strength_follows_the_prompt(backend):
    init = _init_image()
    prompt = "a circle on a blue background"
    low = draw(backend, prompt, init_image=init, strength=0.2, steps=20)
    high = draw(backend, prompt, init_image=init, strength=0.9, steps=20)
    diff_low = np.mean([np.abs(pixels(im) - pixels(init)).mean() for im in low])
    diff_high = np.mean([np.abs(pixels(im) - pixels(init)).mean() for im in high])
    assert diff_low < 25 and diff_high > 2 * diff_low
    assert backgrounds(low) == ["white"] * 4 and colours(low).count("red") >= 3
    assert backgrounds(high) == ["blue"] * 4


def test_inpainting_changes_the_masked_region_and_keeps_the_rest(backend):
    init = _init_image()  # a red square on white, pixels 17-47
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 56, 56))
    prompt = "a circle on a white background"
    pasted = draw(backend, prompt, init_image=init, mask=mask, strength=1.0, steps=20, mask_blur=2)
    blended = draw(backend, prompt, init_image=init, mask=mask, strength=1.0, steps=20, mask_blur=2, overlay=False)
    before = pixels(init)
    keep = np.ones((SIZE, SIZE), bool)
    keep[2:62, 2:62] = False  # beyond the blur
    square = (slice(20, 44), slice(20, 44))
    for p, b in zip(pasted, blended):
        assert np.array_equal(pixels(p)[keep], before[keep])  # A1111's overlay pastes the original back
        assert np.abs(pixels(b)[keep] - before[keep]).mean() < 20  # the latent blend alone keeps it too
        assert np.abs(pixels(p)[square] - before[square]).mean() > 40  # the red square is redrawn
