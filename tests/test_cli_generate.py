"""`mlsd generate` driven as a user drives it: an A1111 models folder, names instead of paths, real PNGs.

Tiny seeded models, 64x64, 2 steps; generations that several tests look at are made once per module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlsd.backends.torch_backend import has_cpp_compiler
from mlsd.cli import main
from mlsd.hashes import lora_short_hash
from mlsd.infotext import GenerationParams, parse_infotext, read_image_parameters
from tests.lora_fixtures import single_thread  # noqa: F401  (autouse: one torch thread)
from tests.test_cli_models import ALL_SAMPLERS, isolate_env, lay_out_models, run_cli, sha10

MLSD_BIN = Path(sys.executable).with_name("mlsd")
PROMPT, NEGATIVE = "a red fox in the snow", "blurry, lowres"
FAST = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "Euler"]


def today() -> str:
    return datetime.now().strftime("%Y-%m-%d")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def fields(path: Path) -> dict[str, str]:
    found = read_image_parameters(path)
    assert found.source == "a1111", f"{path} carries no parameters"
    f = parse_infotext(found.raw)
    if "Size-1" in f:  # parse_infotext splits "Size: WxH" the way A1111's paste does
        f["Size"] = f"{f.pop('Size-1')}x{f.pop('Size-2')}"
    assert f"Size: {f['Size']}," in found.raw
    return f


def params(path: Path) -> GenerationParams:
    return GenerationParams.from_infotext(read_image_parameters(path).raw)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        isolate_env(mp, home)
        yield lay_out_models(tmp_path_factory.mktemp("a1111") / "models", tiny_checkpoints, inpainting=True)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, tmp_path_factory):
    isolate_env(monkeypatch, tmp_path_factory.mktemp("home"))  # outside tmp_path: tests list what is there
    monkeypatch.chdir(tmp_path)


def gen(capsys, models: Path, *argv, model: str = "tiny") -> tuple[int, str, str]:
    return run_cli(capsys, "generate", "--models-dir", models, "--model", model, *argv)


@pytest.fixture(scope="module")
def base(models, tmp_path_factory):
    """One plain txt2img run, in A1111's default outputs layout: (work dir, image)."""
    work = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        isolate_env(mp, tmp_path_factory.mktemp("home"))
        rc = main(["generate", "--models-dir", str(models), "--model", "tiny", "-p", PROMPT, "-n", NEGATIVE,
                   *FAST, "--seed", "5"])
    assert rc == 0
    return work, work / "outputs" / "txt2img-images" / today() / "00000-5.png"


@pytest.fixture(scope="module")
def with_lora_tag(models, tmp_path_factory):
    """The base request plus <lora:style:0.8> in the prompt, written with --output."""
    out = tmp_path_factory.mktemp("lora") / "tagged.png"
    rc = main(["generate", "--models-dir", str(models), "--model", "tiny", "-p", f"{PROMPT} <lora:style:0.8>",
               "-n", NEGATIVE, *FAST, "--seed", "5", "--output", str(out)])
    assert rc == 0
    return out


# ---- txt2img: the first run is also the offline check ------------------------------------------------------


def test_generate_runs_offline(models, no_network, tmp_path, capsys):
    rc, out, err = gen(capsys, models, "-p", "offline", *FAST, "--seed", "1", "--output", "offline.png")
    assert rc == 0, err
    assert out.strip() == "offline.png" and (tmp_path / "offline.png").is_file()


def test_txt2img_default_layout_and_a1111_parameters(base, models):
    work, image = base
    assert files_under(work / "outputs") == [image]  # one image, no grid for a single image
    with Image.open(image) as im:
        assert im.size == (64, 64) and im.format == "PNG"
    f = fields(image)
    assert f["Prompt"] == PROMPT and f["Negative prompt"] == NEGATIVE
    assert f["Steps"] == "2" and f["Sampler"] == "Euler" and f["Seed"] == "5" and f["Size"] == "64x64"
    assert f["Model hash"] == sha10(models / "Stable-diffusion" / "tiny.safetensors")
    assert f["Model"] == "tiny" and f["CFG scale"] == "7"
    assert "Denoising strength" not in f and "Lora hashes" not in f and "VAE hash" not in f


def test_same_seed_same_pixels_other_seed_differs(base, models, capsys):
    rc, _, err = gen(capsys, models, "-p", PROMPT, "-n", NEGATIVE, *FAST, "--seed", "5", "-o", "again.png")
    assert rc == 0, err
    assert np.array_equal(pixels(Path("again.png")), pixels(base[1]))
    rc, _, err = gen(capsys, models, "-p", PROMPT, "-n", NEGATIVE, *FAST, "--seed", "6", "-o", "other.png")
    assert rc == 0, err
    assert np.abs(pixels(Path("other.png")) - pixels(base[1])).mean() > 1.0
    assert fields(Path("other.png"))["Seed"] == "6"


@pytest.mark.skipif(not has_cpp_compiler(), reason="inductor needs a C++ compiler")
def test_compile_draws_the_same_image(base, models, capsys):
    rc, _, err = gen(capsys, models, "-p", PROMPT, "-n", NEGATIVE, *FAST, "--seed", "5", "-o", "compiled.png",
                     "--compile", "--backend", "torch")
    assert rc == 0, err
    got, want = pixels(Path("compiled.png")).astype(float), pixels(base[1]).astype(float)
    assert np.abs(got - want).max() <= 2  # fused kernels sum in another order: at most a rounding step apart
    assert fields(Path("compiled.png"))["Seed"] == "5"


# ---- --output, --overwrite, batches ------------------------------------------------------------------------


def test_output_file_is_never_replaced_without_overwrite(models, tmp_path, capsys):
    target = tmp_path / "sub" / "out.png"
    rc, out, err = gen(capsys, models, "-p", PROMPT, *FAST, "--seed", "1", "--output", target)
    assert rc == 0, err
    assert out.strip() == str(target) and files_under(tmp_path) == [target]  # exactly FILE, no outputs/
    before, mtime = target.read_bytes(), target.stat().st_mtime_ns

    rc, out, err = gen(capsys, models, "-p", PROMPT, *FAST, "--seed", "2", "--output", target)
    assert rc == 2 and out == ""
    assert "already exists" in err and str(target) in err and "--overwrite" in err
    assert target.read_bytes() == before and target.stat().st_mtime_ns == mtime
    assert files_under(tmp_path) == [target]  # no temp files left beside it

    rc, _, err = gen(capsys, models, "-p", PROMPT, *FAST, "--seed", "2", "--output", target, "--overwrite")
    assert rc == 0, err
    assert target.read_bytes() != before and fields(target)["Seed"] == "2"
    assert files_under(tmp_path) == [target]


def test_output_with_batch_writes_numbered_stems(models, tmp_path, capsys):
    rc, out, err = gen(capsys, models, "-p", PROMPT, *FAST, "--seed", "20", "--batch-size", "2",
                       "-o", "pic.png")
    assert rc == 0, err
    assert files_under(tmp_path) == [tmp_path / "pic-1.png", tmp_path / "pic-2.png"]  # no pic.png, no grid
    assert [fields(tmp_path / f"pic-{i}.png")["Seed"] for i in (1, 2)] == ["20", "21"]
    assert out.split() == ["pic-1.png", "pic-2.png"]


def test_batch_writes_numbered_files_seed_plus_i_and_a_grid(models, tmp_path, capsys):
    rc, out, err = gen(capsys, models, "-p", PROMPT, *FAST, "--seed", "10", "--batch-size", "2")
    assert rc == 0, err
    day = today()
    a = tmp_path / "outputs" / "txt2img-images" / day / "00000-10.png"
    b = tmp_path / "outputs" / "txt2img-images" / day / "00001-11.png"
    grid = tmp_path / "outputs" / "txt2img-grids" / day / "grid-0000.png"
    assert files_under(tmp_path / "outputs") == sorted([a, b, grid])
    assert [fields(p)["Seed"] for p in (a, b)] == ["10", "11"]
    assert not np.array_equal(pixels(a), pixels(b))
    with Image.open(grid) as g:
        assert g.size == (128, 64)  # A1111's grid: round(sqrt(2)) = 1 row of 2
    assert np.array_equal(pixels(grid)[:, :64], pixels(a)) and np.array_equal(pixels(grid)[:, 64:], pixels(b))
    assert fields(grid)["Seed"] == "10"  # the grid carries the first image's parameters
    assert out.split() == [str(a.relative_to(tmp_path)), str(b.relative_to(tmp_path))]


# ---- img2img, inpainting, outpainting ----------------------------------------------------------------------


def test_img2img_goes_to_img2img_images_with_denoising_strength(base, models, tmp_path, capsys):
    rc, _, err = gen(capsys, models, "-p", "a fox at night", *FAST, "--seed", "3", "--init-image", base[1],
                     "--strength", "0.5")
    assert rc == 0, err
    (image,) = files_under(tmp_path / "outputs")
    assert image == tmp_path / "outputs" / "img2img-images" / today() / "00000-3.png"
    f = fields(image)
    assert f["Denoising strength"] == "0.5" and f["Prompt"] == "a fox at night" and f["Size"] == "64x64"
    assert not np.array_equal(pixels(image), pixels(base[1]))


def _right_half_mask(path: Path) -> Path:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half only
    mask.save(path)
    return path


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny"])  # an inpainting model, and a plain one
def test_inpaint_with_mask(model, base, models, tmp_path, capsys):
    rc, _, err = gen(capsys, models, "-p", "a cat", *FAST, "--seed", "4", "--init-image", base[1],
                     "--mask", _right_half_mask(tmp_path / "mask.png"), model=model)
    assert rc == 0, err
    (image,) = files_under(tmp_path / "outputs")
    assert image == tmp_path / "outputs" / "img2img-images" / today() / "00000-4.png"
    f = fields(image)
    assert f["Model"] == model and f["Size"] == "64x64" and f["Mask blur"] == "4"
    assert f["Denoising strength"] == "0.75" and f["Prompt"] == "a cat"
    assert not np.array_equal(pixels(image), pixels(base[1]))


def test_inpaint_keeps_the_unmasked_side_like_a1111(base, models, tmp_path, capsys):
    rc, _, err = gen(capsys, models, "-p", "a cat", *FAST, "--seed", "4", "--init-image", base[1],
                     "--mask", _right_half_mask(tmp_path / "mask.png"), "--mask-blur", "0", "-o", "in.png",
                     model="tiny-inpaint")
    assert rc == 0, err
    got, init = pixels(Path("in.png")), pixels(base[1])
    assert np.abs(got[:, :32] - init[:, :32]).max() <= 1  # untouched where the mask is black
    assert np.abs(got[:, 32:] - init[:, 32:]).mean() > 1.0  # repainted where it is white


def test_outpaint_grows_the_canvas(base, models, tmp_path, capsys):
    rc, _, err = gen(capsys, models, "-p", "a wider view", *FAST, "--seed", "4", "--init-image", base[1],
                     "--outpaint", "8,8,0,0", model="tiny-inpaint")
    assert rc == 0, err
    (image,) = files_under(tmp_path / "outputs")
    with Image.open(image) as im:
        assert im.size == (80, 64)
    assert image.parent.parent.name == "img2img-images" and fields(image)["Size"] == "80x64"


# ---- LoRAs and VAEs from the models folder -----------------------------------------------------------------


def test_lora_tag_in_prompt_resolves_from_models_lora(base, with_lora_tag, models):
    assert np.abs(pixels(with_lora_tag) - pixels(base[1])).mean() > 1.0  # same request, LoRA merged
    f = fields(with_lora_tag)
    assert f["Prompt"] == f"{PROMPT} <lora:style:0.8>"  # the tag stays, so A1111 reproduces the image
    lora_file = models / "Lora" / "style.safetensors"
    assert params(with_lora_tag).lora_hashes == {"style": lora_short_hash(lora_file, cache=False)}


def test_lora_option_resolves_by_name_and_differs_by_weight(base, with_lora_tag, models, capsys):
    rc, out, err = gen(capsys, models, "-p", PROMPT, "-n", NEGATIVE, *FAST, "--seed", "5",
                       "--lora", "style:0.5", "-o", "opt.png", "--json")
    assert rc == 0, err
    assert json.loads(out)["images"] == ["opt.png"]  # merging a LoRA prints nothing into the JSON
    got = pixels(Path("opt.png"))
    assert np.abs(got - pixels(base[1])).mean() > 0.5
    assert not np.array_equal(got, pixels(with_lora_tag))  # 0.5 is not 0.8
    f = fields(Path("opt.png"))
    assert f["Prompt"] == f"{PROMPT} <lora:style:0.5>" and "style: " in f["Lora hashes"]


def test_unknown_lora_lists_available_and_writes_nothing(models, tmp_path, capsys):
    for argv in (["-p", "x <lora:nope:1>"], ["-p", "x", "--lora", "nope:0.7"]):
        rc, out, err = gen(capsys, models, *argv, *FAST)
        assert rc == 2 and out == ""
        assert "No lora named 'nope'" in err and "style" in err
        assert files_under(tmp_path) == []


def test_vae_by_name_from_models_vae(base, models, capsys):
    rc, _, err = gen(capsys, models, "-p", PROMPT, "-n", NEGATIVE, *FAST, "--seed", "5", "--vae", "tinyvae",
                     "-o", "vae.png")
    assert rc == 0, err
    assert np.abs(pixels(Path("vae.png")) - pixels(base[1])).mean() > 1.0
    f = fields(Path("vae.png"))
    assert f["VAE"] == "tinyvae.safetensors"
    assert f["VAE hash"] == sha10(models / "VAE" / "tinyvae.safetensors")


# ---- --from-image ------------------------------------------------------------------------------------------


def test_from_image_reproduces_the_image(base, models, capsys):
    # No --model either: the image's "Model: tiny" names it.
    rc, _, err = run_cli(capsys, "generate", "--models-dir", models, "--from-image", base[1], "-o", "re.png")
    assert rc == 0, err
    assert np.array_equal(pixels(Path("re.png")), pixels(base[1]))
    assert fields(Path("re.png")) == fields(base[1])


def test_from_image_with_lora_tag_reproduces_it(with_lora_tag, models, capsys):
    rc, _, err = gen(capsys, models, "--from-image", with_lora_tag, "-o", "re.png")
    assert rc == 0, err
    assert np.array_equal(pixels(Path("re.png")), pixels(with_lora_tag))


def test_from_image_explicit_flags_override(base, models, capsys):
    rc, _, err = gen(capsys, models, "--from-image", base[1], "--seed", "6", "--steps", "3", "-o", "o.png")
    assert rc == 0, err
    f = fields(Path("o.png"))
    assert f["Seed"] == "6" and f["Steps"] == "3"
    assert f["Prompt"] == PROMPT and f["Negative prompt"] == NEGATIVE and f["Size"] == "64x64"
    assert not np.array_equal(pixels(Path("o.png")), pixels(base[1]))


# ---- invalid input: exit 2, one message naming the option, nothing written ---------------------------------


def _init_png(path: Path, size=(64, 64)) -> Path:
    Image.new("RGB", size, (90, 120, 200)).save(path)
    return path


INVALID = {
    "width": (["--width", "60"], "--width"),
    "steps": (["--steps", "0"], "--steps"),
    "strength": (["--init-image", "init.png", "--strength", "1.5"], "--strength"),
    "sampler": (["--sampler", "Eulr"], "--sampler"),
    "mask size": (["--init-image", "init.png", "--mask", "small.png"], "small.png"),
    "missing init": (["--init-image", "missing.png"], "--init-image"),
    "mask without init": (["--mask", "small.png"], "--init-image"),
    "missing model": (["--model", "nope"], "nope"),
    "outpaint": (["--init-image", "init.png", "--outpaint", "8,8"], "--outpaint"),
    "no prompt": ([], "--prompt"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_exits_2_and_writes_nothing(case, models, tmp_path, capsys):
    _init_png(tmp_path / "init.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    before = files_under(tmp_path)
    argv, option = INVALID[case]
    base_argv = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "Euler"]
    if case != "no prompt":
        base_argv += ["-p", "a fox"]
    rc, out, err = run_cli(capsys, "generate", "--models-dir", models, "--model", "tiny", *base_argv, *argv)
    assert rc == 2, err
    assert out == ""
    assert err.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err
    assert option in err, err
    assert "fix:" in err
    assert files_under(tmp_path) == before  # no outputs/ folder, nothing else either
    if case == "sampler":
        assert all(name in err for name in ALL_SAMPLERS)
    if case == "missing model":
        assert "tiny" in err and "tiny-inpaint" in err  # what is available
    if case == "mask size":
        assert "(32, 32)" in err and "(64, 64)" in err


def test_malicious_pickle_is_refused_and_never_runs(models, tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = models / "Stable-diffusion" / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": Evil()}}, evil)
    try:
        rc, out, err = gen(capsys, models, "-p", "x", *FAST, model="evil")
    finally:
        evil.unlink()
    assert rc == 2 and out == ""
    assert err.startswith("error: Refused unsafe pickle:") and "system" in err
    assert "evil.ckpt" in err and "Traceback" not in err
    assert not marker.exists()
    assert files_under(tmp_path) == []  # no outputs/


# Real processes: the exit status and stderr a shell sees (each one pays the torch import, so only two).


def test_usage_error_in_a_real_process(models, tmp_path):
    argv = [MLSD_BIN, "generate", "--models-dir", models, "-m", "tiny", "-p", "x", "--width", "100"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: Invalid option: ") and "100x512" in lines[0]
    assert lines[1].strip() == "where: --width/--height" and lines[2].lstrip().startswith("fix:")
    assert len(lines) == 3 and list(tmp_path.iterdir()) == []


def test_unknown_model_in_a_real_process(models, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLSD_MODELS_DIR"} | {"MLSD_MODELS_DIR": str(models)}
    proc = subprocess.run([MLSD_BIN, "generate", "-m", "v1-5-pruned", "-p", "x", "--debug"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback (most recent call last)" in proc.stderr  # --debug
    message = proc.stderr[proc.stderr.index("error: Model not found:"):]
    assert "v1-5-pruned" in message and "one of: tiny-inpaint, tiny;" in message
    assert "MLSD_MODELS_DIR" in message
    assert list(tmp_path.iterdir()) == []


# ---- --json and random seeds -------------------------------------------------------------------------------


def test_json_output_and_random_seed(models, tmp_path, capsys):
    rc, out, err = gen(capsys, models, "-p", "x", *FAST, "--seed", "-1", "--batch-size", "2", "--json")
    assert rc == 0, err
    data = json.loads(out)  # stdout is the JSON and nothing else
    first = data["seeds"][0]
    assert isinstance(first, int) and first >= 0 and data["seeds"] == [first, first + 1]
    assert [Path(p).name for p in data["images"]] == [f"00000-{first}.png", f"00001-{first + 1}.png"]
    assert all((tmp_path / p).is_file() for p in data["images"]) and (tmp_path / data["grid"]).is_file()
    assert data["precision"] == "fp32" and data["device"].startswith("cpu") and data["seconds"] > 0

    rc, out, err = gen(capsys, models, "-p", "x", *FAST, "--seed", "-1", "-o", "r.png")
    assert rc == 0, err
    seed = int(fields(Path("r.png"))["Seed"])
    assert f"seed: {seed}" in err and out.strip() == "r.png"
