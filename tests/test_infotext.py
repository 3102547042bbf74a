"""A1111 infotext: writing, parsing and image metadata (PNG/JPEG/WebP/ComfyUI)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mlsd.errors import InputFileError
from mlsd.infotext import (
    GenerationParams,
    decode_user_comment,
    exif_with_parameters,
    format_infotext,
    lora_hashes_field,
    normalize_sampler,
    parse_infotext,
    png_pnginfo,
    quote,
    read_image_parameters,
)

# Shaped like A1111 1.6 output: multi-line prompt, quoted Lora hashes, hires extras, old sampler form.
A1111_OLD = (
    "masterpiece, best quality, 1girl,\n(detailed eyes:1.2) <lora:add_detail:0.5>\n"
    "Negative prompt: lowres, bad anatomy,\nworst quality\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3912356387, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent, "
    'Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", Version: v1.6.0'
)
# A1111 >= 1.9 splits the schedule type off the sampler.
A1111_NEW = (
    "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, "
    "Size: 512x512, Model hash: 6ce0161689, Version: v1.10.1"
)


def test_quote_rules():
    assert quote("Euler a") == "Euler a"
    assert quote(7) == "7"
    assert quote("a, b") == '"a, b"'
    assert quote("x: y") == '"x: y"'
    assert quote("two\nlines") == '"two\\nlines"'
    assert quote('say "hi", ok') == '"say \\"hi\\", ok"'
    assert quote("日本, é") == '"日本, é"'  # ensure_ascii=False, like A1111


def test_format_follows_a1111_order():
    text = format_infotext(
        "a cat",
        "",
        {
            "Version": "v1.6.0",
            "Lora hashes": lora_hashes_field({"add:detail": "7c6bad76eb54", "b,c": "3b8aa1d351ef"}),
            "Hires upscale": 2.0,
            "Seed": 5,
            "Tiling": False,
            "Clip skip": 1,
            "Size": "512x768",
            "Steps": 20,
            "CFG scale": 7.0,
            "Denoising strength": 0.45,
            "Sampler": "Euler a",
            "VAE": None,
        },
    )
    assert text == (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x768, "
        'Denoising strength: 0.45, Hires upscale: 2, Lora hashes: "adddetail: 7c6bad76eb54, bc: 3b8aa1d351ef", '
        "Version: v1.6.0"
    )
    assert "Clip skip: 2" in format_infotext("p", "", {"Clip skip": 2, "Steps": 1, "Seed": 1})
    assert format_infotext("p", "neg", {"Tiling": True}) == "p\nNegative prompt: neg\nTiling: True"


def test_parse_old_a1111_text():
    f = parse_infotext(A1111_OLD)
    assert f["Prompt"] == "masterpiece, best quality, 1girl,\n(detailed eyes:1.2) <lora:add_detail:0.5>"
    assert f["Negative prompt"] == "lowres, bad anatomy,\nworst quality"
    assert (f["Size-1"], f["Size-2"]) == ("512", "768") and "Size" not in f
    assert f["Lora hashes"] == "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"
    assert f["Hires upscale"] == "2" and f["Hires upscaler"] == "Latent" and f["Clip skip"] == "2"
    assert normalize_sampler(f) == "DPM++ 2M Karras"


def test_parse_new_sampler_form_and_escapes():
    f = parse_infotext(A1111_NEW)
    assert f["Sampler"] == "DPM++ 2M" and f["Schedule type"] == "Karras"
    assert normalize_sampler(f) == "DPM++ 2M Karras"
    assert normalize_sampler({"Sampler": "Euler a", "Schedule type": "Automatic"}) == "Euler a"
    assert normalize_sampler({"Sampler": "Euler"}) == "Euler"
    assert normalize_sampler({"Sampler": "DPM++ 2M Karras", "Schedule type": "Karras"}) == "DPM++ 2M Karras"
    f = parse_infotext('p\nSteps: 1, Seed: 2, Template: "a \\"b\\", c", Hires resize: 1024x1536')
    assert f["Template"] == 'a "b", c' and (f["Hires resize-1"], f["Hires resize-2"]) == ("1024", "1536")


def test_last_line_needs_three_fields_to_be_parameters():
    f = parse_infotext("a photo, style: anime\nSteps: 20, Seed: 1")
    assert f == {"Prompt": "a photo, style: anime\nSteps: 20, Seed: 1", "Negative prompt": ""}
    assert parse_infotext("Steps: 20, Sampler: Euler, Seed: 3")["Prompt"] == ""
    assert parse_infotext("a\r\nSteps: 20, Sampler: Euler, Seed: 3\r\n")["Seed"] == "3"


FULL = GenerationParams(
    prompt="masterpiece, (cat:1.2)\nsecond line, <lora:add_detail:0.5>",
    negative_prompt="lowres, blurry",
    steps=28,
    sampler="DPM++ 2M Karras",
    cfg_scale=7.5,
    seed=3912356387,
    width=512,
    height=768,
    model_hash="6ce0161689",
    model_name="v1-5-pruned-emaonly",
    vae_hash="735e4c3a44",
    vae_name="vae-ft-mse-840000",
    denoising_strength=0.45,
    clip_skip=2,
    lora_hashes={"add_detail": "7c6bad76eb54", "more_details": "3b8aa1d351ef"},
    extra={"Hires upscale": "2", "Hires upscaler": "R-ESRGAN 4x+", "TI hashes": "easyneg: c74b4e810b03"},
    version="mlsd 0.1.0",
)


@pytest.mark.parametrize("split", [False, True])
def test_generation_params_round_trip(split):
    text = FULL.to_infotext(split_sampler=split)
    assert ("Schedule type: Karras" in text) == split
    assert GenerationParams.from_infotext(text) == FULL
    minimal = GenerationParams(prompt="a cat", steps=20, sampler="Euler a", seed=1)
    assert GenerationParams.from_infotext(minimal.to_infotext()) == minimal


def test_generation_params_from_real_text():
    g = GenerationParams.from_infotext(A1111_OLD)
    assert (g.steps, g.sampler, g.cfg_scale, g.seed, g.width, g.height) == (
        28, "DPM++ 2M Karras", 7.0, 3912356387, 512, 768,
    )  # fmt: skip
    assert g.lora_hashes == {"add_detail": "7c6bad76eb54", "more_details": "3b8aa1d351ef"}
    assert g.clip_skip == 2 and g.version == "v1.6.0" and g.extra["Hires steps"] == "15"
    assert GenerationParams.from_infotext(A1111_NEW).sampler == "DPM++ 2M Karras"


# ---- images ----


def _png(path, pnginfo=None):
    Image.new("RGB", (8, 8), "red").save(path, pnginfo=pnginfo)
    return path


def test_png_text_chunks(tmp_path):
    text = FULL.to_infotext()
    latin = _png(tmp_path / "latin.png", png_pnginfo(text))
    assert b"tEXtparameters" in latin.read_bytes()  # Latin-1 fits: tEXt, as A1111's add_text writes
    got = read_image_parameters(latin)
    assert got.source == "a1111" and got.raw == text and got.fields == parse_infotext(text)
    cjk = _png(tmp_path / "cjk.png", png_pnginfo("日本の猫\nSteps: 20, Sampler: Euler, Seed: 1"))
    assert b"iTXtparameters" in cjk.read_bytes()
    assert read_image_parameters(cjk).fields["Prompt"] == "日本の猫"
    info = PngInfo()  # iTXt written directly, as other tools do
    info.add_itxt("parameters", "a cat\nSteps: 5, Sampler: Euler, Seed: 9", zip=True)
    assert read_image_parameters(_png(tmp_path / "itxt.png", info)).fields["Seed"] == "9"


def _exif_image(path, comment: bytes):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    Image.new("RGB", (8, 8), "blue").save(path, exif=exif)
    return path


@pytest.mark.parametrize("ext", ["jpg", "webp"])
@pytest.mark.parametrize(
    "encode",
    [
        lambda t: b"UNICODE\0" + t.encode("utf-16-be"),  # A1111 via piexif
        lambda t: b"UNICODE\0" + t.encode("utf-16-le"),  # some other tools
        lambda t: b"ASCII\0\0\0" + t.encode("ascii", "replace"),
    ],
)
def test_exif_user_comment(tmp_path, ext, encode):
    text = "a cat, (sky:1.2)\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 42, Size: 512x512"
    got = read_image_parameters(_exif_image(tmp_path / f"x.{ext}", encode(text)))
    assert got.source == "a1111" and got.raw == text
    assert got.fields["Negative prompt"] == "dog" and got.fields["Size-2"] == "512"


def test_exif_helper_and_decoding(tmp_path):
    path = tmp_path / "ours.jpg"
    Image.new("RGB", (8, 8)).save(
        path, exif=exif_with_parameters("日本, é\nSteps: 1, Seed: 2, Sampler: Euler")
    )
    assert read_image_parameters(path).fields["Prompt"] == "日本, é"
    assert decode_user_comment(b"UNICODE\0" + "日本".encode("utf-16-be")) == "日本"
    assert decode_user_comment(b"UNICODE\0\xff\xfe" + "ab".encode("utf-16-le")) == "ab"
    assert decode_user_comment(b"UNICODE\0" + "héllo".encode()) == "héllo"  # mislabelled UTF-8
    assert decode_user_comment(b"\0" * 8 + b"abc\0") == "abc"


def _comfy_png(path, **chunks):
    info = PngInfo()
    for k, v in chunks.items():
        info.add_text(k, json.dumps(v))
    return _png(path, info)


def test_comfyui_png(tmp_path):
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 20, "cfg": 8.0,
              "positive": ["6", 0], "negative": ["7", 0], "model": ["4", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat, sky", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    }  # fmt: skip
    got = read_image_parameters(_comfy_png(tmp_path / "c.png", prompt=graph, workflow={"nodes": []}))
    assert got.source == "comfyui" and "ComfyUI" in got.note
    assert got.fields == {"Prompt": "a cat, sky", "Negative prompt": "blurry", "Seed": "7", "Steps": "20",
                          "CFG scale": "8.0"}  # fmt: skip
    graph["6"]["inputs"]["text"] = ["10", 0]  # text produced by another node: not simple
    got = read_image_parameters(_comfy_png(tmp_path / "d.png", prompt=graph))
    assert got.source == "comfyui" and got.fields == {} and "could not" in got.note
    lone = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "only one"}}}
    assert read_image_parameters(_comfy_png(tmp_path / "e.png", prompt=lone)).fields["Prompt"] == "only one"
    assert read_image_parameters(_comfy_png(tmp_path / "w.png", workflow={"nodes": []})).source == "comfyui"


def test_images_without_parameters_and_bad_files(tmp_path):
    assert read_image_parameters(_png(tmp_path / "plain.png")).source == "none"
    with pytest.raises(InputFileError):
        read_image_parameters(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputFileError):
        read_image_parameters(tmp_path / "junk.png")
