"""Saving images the A1111 way: folders, numbering, --output, no clobbering, atomic writes, infotext."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mlsd import __version__, outputs
from mlsd.errors import UsageError
from mlsd.infotext import GenerationParams, read_image_parameters
from mlsd.outputs import ModelStamp, check_targets, grid_shape, infotext_for, output_paths, save_result
from mlsd.pipeline.request import GenerationRequest, GenerationResult

DAY = datetime(2024, 5, 1, 13, 45)
COLORS = ["red", "green", "blue", "white", "black", "yellow", "cyan"]


@pytest.fixture
def model_files(tmp_path):
    """A small checkpoint, VAE and LoRA on disk, and their hashes computed independently."""
    ckpt = tmp_path / "models" / "tiny-model.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(os.urandom(5000))
    vae = tmp_path / "models" / "my-vae.pt"
    vae.write_bytes(os.urandom(300))
    lora = tmp_path / "models" / "detail.safetensors"
    save_file({"w": torch.arange(16, dtype=torch.float32)}, str(lora))
    data = lora.read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little") :]
    return {
        "ckpt": ckpt, "vae": vae, "lora": lora,
        "ckpt_hash": hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10],
        "vae_hash": hashlib.sha256(vae.read_bytes()).hexdigest()[:10],
        "lora_hash": hashlib.sha256(body).hexdigest()[:12],
    }  # fmt: skip


@pytest.fixture
def stamp(model_files, tmp_path):
    return ModelStamp.from_paths(model_files["ckpt"], loras=[(model_files["lora"], 0.6)],
                                 cache=tmp_path / "hashes.json")  # fmt: skip


def _result(n=1, size=(16, 24), seeds=None, **request_kw) -> GenerationResult:
    request = GenerationRequest(
        prompt="a cat, (sky:1.2) <lora:detail:0.6>", negative_prompt="blurry, dog", steps=12,
        cfg_scale=6.5, sampler="dpm++ 2m karras", width=size[0], height=size[1], **request_kw,
    )  # fmt: skip
    images = [Image.new("RGB", size, COLORS[i % len(COLORS)]) for i in range(n)]
    return GenerationResult(images, seeds or [100 + i for i in range(n)], request, seconds=0.1)


def _params(path) -> GenerationParams:
    found = read_image_parameters(path)
    assert found.source == "a1111"
    return GenerationParams.from_infotext(found.raw)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_layout_counter_and_parameters(tmp_path, stamp, model_files):
    day_dir = tmp_path / "out" / "txt2img-images" / "2024-05-01"
    day_dir.mkdir(parents=True)
    (day_dir / "00007-1.png").write_bytes(b"older image")
    (day_dir / "notes.txt").write_text("not numbered")
    saved = save_result(_result(3, seeds=[11, 12, 13]), stamp, outputs_root=tmp_path / "out", now=DAY)
    assert [p.name for p in saved.paths] == ["00008-11.png", "00009-12.png", "00010-13.png"]
    assert all(p.parent == day_dir for p in saved.paths)
    assert (day_dir / "00007-1.png").read_bytes() == b"older image"
    assert saved.grid == tmp_path / "out" / "txt2img-grids" / "2024-05-01" / "grid-0000.png"
    for path, seed, text in zip(saved.paths, [11, 12, 13], saved.infotexts, strict=True):
        assert read_image_parameters(path).raw == text
        g = _params(path)
        assert (g.prompt, g.negative_prompt) == ("a cat, (sky:1.2) <lora:detail:0.6>", "blurry, dog")
        assert (g.steps, g.sampler, g.cfg_scale, g.seed, g.width, g.height) == (
            12, "DPM++ 2M Karras", 6.5, seed, 16, 24,
        )  # fmt: skip
        assert (g.model_hash, g.model_name) == (model_files["ckpt_hash"], "tiny-model")
        assert g.lora_hashes == {"detail": model_files["lora_hash"]}
        assert g.version == f"mlsd {__version__}"
        assert g.denoising_strength is None and g.vae_hash is None and "Clip skip" not in text
    assert _leftovers(day_dir) == []
    again = save_result(_result(1, seeds=[5]), stamp, outputs_root=tmp_path / "out", now=DAY)
    assert again.paths[0].name == "00011-5.png" and again.grid is None


def test_img2img_inpaint_and_outpaint_share_the_img2img_folders(tmp_path, stamp):
    init = Image.new("RGB", (16, 16), "gray")
    mask = Image.new("L", (16, 16), 255)
    for kw in ({"init_image": init, "strength": 0.4}, {"init_image": init, "mask": mask, "strength": 0.4},
               {"init_image": init, "outpaint": (8, 8, 0, 0), "strength": 0.4}):  # fmt: skip
        saved = save_result(_result(2, size=(16, 16), **kw), stamp, outputs_root=tmp_path, now=DAY)
        assert all(p.parent == tmp_path / "img2img-images" / "2024-05-01" for p in saved.paths)
        assert saved.grid.parent == tmp_path / "img2img-grids" / "2024-05-01"
        g = _params(saved.paths[0])
        assert g.denoising_strength == 0.4
        assert g.extra.get("Mask blur") == ("4" if "mask" in kw else None)
    names = sorted(p.name for p in (tmp_path / "img2img-images" / "2024-05-01").iterdir())
    assert names[-1] == "00005-101.png"
    assert not (tmp_path / "txt2img-images").exists()


@pytest.mark.parametrize(
    ("n", "rows", "cols"), [(2, 1, 2), (3, 2, 2), (4, 2, 2), (5, 2, 3), (6, 2, 3), (7, 3, 3)]
)
def test_grid_shape_and_size(tmp_path, stamp, n, rows, cols):
    assert grid_shape(n) == (rows, cols)
    saved = save_result(_result(n, size=(16, 24)), stamp, outputs_root=tmp_path, now=DAY)
    with Image.open(saved.grid) as grid:
        assert grid.size == (cols * 16, rows * 24)
        assert grid.getpixel((0, 0)) == (255, 0, 0)  # first image top-left
        last_in_row = Image.new("RGB", (1, 1), COLORS[cols - 1]).getpixel((0, 0))
        assert grid.getpixel((cols * 16 - 1, 0)) == last_in_row
        assert grid.info["parameters"] == saved.infotexts[0]
    assert save_result(_result(n), stamp, outputs_root=tmp_path / "nogrid", grid=False, now=DAY).grid is None


def test_output_single_and_multi_naming(tmp_path, stamp):
    single = save_result(_result(1, seeds=[7]), stamp, output=tmp_path / "sub" / "cat.png")
    assert single.paths == [tmp_path / "sub" / "cat.png"] and single.grid is None
    assert _params(single.paths[0]).seed == 7
    multi = save_result(_result(3, seeds=[1, 2, 3]), stamp, output=tmp_path / "many.png")
    assert [p.name for p in multi.paths] == ["many-1.png", "many-2.png", "many-3.png"]
    assert [_params(p).seed for p in multi.paths] == [1, 2, 3]
    assert output_paths(tmp_path / "x.webp", 2) == [tmp_path / "x-1.webp", tmp_path / "x-2.webp"]
    jpg = save_result(_result(1, seeds=[9]), stamp, output=tmp_path / "cat.jpg").paths[0]
    assert jpg.read_bytes()[:2] == b"\xff\xd8" and _params(jpg).seed == 9  # EXIF UserComment
    with pytest.raises(UsageError, match="format"):
        save_result(_result(1), stamp, output=tmp_path / "cat.gif")
    assert not (tmp_path / "cat.gif").exists() and _leftovers(tmp_path) == []


def test_refuses_to_overwrite_and_writes_nothing(tmp_path, stamp):
    (tmp_path / "many-2.png").write_bytes(b"keep me")
    with pytest.raises(UsageError) as err:
        save_result(_result(3), stamp, output=tmp_path / "many.png")
    assert "many-2.png" in str(err.value) and "--overwrite" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hashes.json", "many-2.png", "models"]
    assert (tmp_path / "many-2.png").read_bytes() == b"keep me"


def test_check_targets_before_generating(tmp_path):
    assert check_targets(None, 4) == []
    assert check_targets(tmp_path / "a.png", 2) == [tmp_path / "a-1.png", tmp_path / "a-2.png"]
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(UsageError, match="already exists"):
        check_targets(tmp_path / "a.png", 1)
    assert check_targets(tmp_path / "a.png", 1, overwrite=True) == [tmp_path / "a.png"]
    (tmp_path / "d.png").mkdir()
    with pytest.raises(UsageError, match="folder"):
        check_targets(tmp_path / "d.png", 1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d.png"]


def test_overwrite_replaces(tmp_path, stamp):
    target = tmp_path / "cat.png"
    target.write_bytes(b"old")
    save_result(_result(1, seeds=[42]), stamp, output=target, overwrite=True)
    assert _params(target).seed == 42 and _leftovers(tmp_path) == []


def test_output_race_rolls_back_what_this_call_wrote(tmp_path, stamp, monkeypatch):
    real = outputs._write_temp

    def sneaky(image, final, text):  # another program creates the second file after the checks
        if final.name == "many-2.png":
            final.write_bytes(b"theirs")
        return real(image, final, text)

    monkeypatch.setattr(outputs, "_write_temp", sneaky)
    with pytest.raises(UsageError, match="appeared"):
        save_result(_result(2), stamp, output=tmp_path / "many.png")
    assert not (tmp_path / "many-1.png").exists() and (tmp_path / "many-2.png").read_bytes() == b"theirs"
    assert _leftovers(tmp_path) == []


def test_numbered_names_never_clobber_under_a_race(tmp_path, stamp, monkeypatch):
    folder = tmp_path / "txt2img-images" / "2024-05-01"
    folder.mkdir(parents=True)
    (folder / "00000-100.png").write_bytes(b"theirs")
    monkeypatch.setattr(outputs, "next_sequence_number", lambda *a, **k: 0)  # a stale scan
    saved = save_result(_result(1), stamp, outputs_root=tmp_path, now=DAY)
    assert saved.paths[0].name == "00001-100.png"
    assert (folder / "00000-100.png").read_bytes() == b"theirs" and _leftovers(folder) == []


@pytest.mark.parametrize("use_output", [False, True])
def test_failed_write_leaves_no_file_and_no_temp(tmp_path, stamp, monkeypatch, use_output):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half an image")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    kw = {"output": tmp_path / "out" / "cat.png"} if use_output else {"outputs_root": tmp_path / "out"}
    with pytest.raises(OSError, match="No space"):
        save_result(_result(1), stamp, now=DAY, **kw)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_stamp_vae_clip_skip_and_loras_outside_the_prompt(tmp_path, model_files):
    cache = tmp_path / "hashes.json"
    old_lora = model_files["lora"].with_name("x.pt")
    old_lora.write_bytes(b"pt")
    loras = [(model_files["lora"], 0.6), (old_lora, 1.0)]
    stamp = ModelStamp.from_paths(model_files["ckpt"], model_files["vae"], loras, cache=cache)
    assert (stamp.vae_name, stamp.vae_hash) == ("my-vae.pt", model_files["vae_hash"])
    pt_hash = hashlib.sha256(b"pt").hexdigest()[:12]  # not safetensors: plain sha256
    assert stamp.lora_hashes == {"detail": model_files["lora_hash"], "x": pt_hash}
    assert str(model_files["ckpt"].resolve()) in cache.read_text()  # went through the hash cache
    request = GenerationRequest(prompt="a cat <lora:detail:0.6>", clip_skip=2, sampler="Euler a")
    g = GenerationParams.from_infotext(infotext_for(request, 5, (64, 32), stamp))
    assert g.prompt == "a cat <lora:detail:0.6> <lora:x:1>"  # so A1111 applies x too
    assert (g.clip_skip, g.sampler, g.seed, g.width, g.height) == (2, "Euler a", 5, 64, 32)
    assert (g.vae_name, g.vae_hash) == ("my-vae.pt", model_files["vae_hash"])
    assert g.model_hash == model_files["ckpt_hash"]
    for tag in ("detail.safetensors", "loras/Detail"):  # other spellings of the same LoRA
        text = infotext_for(GenerationRequest(prompt=f"cat <lora:{tag}:0.5>"), 1, (8, 8), stamp)
        assert GenerationParams.from_infotext(text).prompt == f"cat <lora:{tag}:0.5> <lora:x:1>"
    bare = ModelStamp("m", None)
    assert "Model hash" not in infotext_for(request, 1, (8, 8), bare)
