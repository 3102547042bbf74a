"""`mlsd info IMAGE`: generation parameters from mlsd, A1111, Civitai and ComfyUI images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mlsd.cli import main
from mlsd.infotext import GenerationParams, exif_with_parameters, png_pnginfo

A1111 = (
    "a cat, (sky:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
    "CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, Version: v1.10.1"
)
# Civitai's generator writes A1111 text into the JPEG's EXIF UserComment and adds its own fields.
CIVITAI = (
    "portrait of a knight\nNegative prompt: lowres\nSteps: 30, Sampler: Euler a, CFG scale: 5, Seed: 7, "
    'Size: 832x1216, Clip skip: 2, Civitai resources: [{"type":"checkpoint","modelVersionId":1}]'
)
MLSD_BIN = Path(sys.executable).with_name("mlsd")


def _png(path, text):
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_pnginfo(text) if text else None)
    return str(path)


def _run(capsys, *argv):
    rc = main(["info", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_prints_png_parameters_verbatim(tmp_path, capsys):
    ours = GenerationParams(prompt="日本の猫", steps=4, sampler="Euler", seed=1, version="mlsd 0.1.0")
    for name, text in (("a1111.png", A1111), ("ours.png", ours.to_infotext())):
        rc, out, err = _run(capsys, _png(tmp_path / name, text))
        assert (rc, out, err) == (0, text + "\n", "")


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_prints_exif_user_comment(tmp_path, capsys, ext):
    path = tmp_path / f"civitai.{ext}"
    Image.new("RGB", (8, 8)).save(path, exif=exif_with_parameters(CIVITAI))
    rc, out, _ = _run(capsys, path)
    assert rc == 0 and out == CIVITAI + "\n"


def test_json_gives_fields_and_typed_params(tmp_path, capsys):
    rc, out, _ = _run(capsys, _png(tmp_path / "a.png", A1111), "--json")
    data = json.loads(out)
    assert rc == 0 and data["source"] == "a1111" and data["parameters"] == A1111
    assert data["fields"]["Prompt"] == "a cat, (sky:1.2)" and data["fields"]["Schedule type"] == "Karras"
    params = data["params"]
    assert (params["steps"], params["sampler"], params["cfg_scale"]) == (20, "DPM++ 2M Karras", 7.5)
    assert params["seed"] == 42
    assert (params["width"], params["height"], params["model_hash"]) == (512, 768, "6ce0161689")


def test_comfyui_workflow(tmp_path, capsys):
    graph = {
        "3": {"class_type": "KSampler",
              "inputs": {"seed": 9, "steps": 25, "positive": ["6", 0], "negative": ["7", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly"}},
    }  # fmt: skip
    info = PngInfo()
    info.add_text("prompt", json.dumps(graph))
    info.add_text("workflow", json.dumps({"nodes": []}))
    path = tmp_path / "comfy.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    rc, out, _ = _run(capsys, path)
    assert rc == 0 and out.startswith("ComfyUI workflow")
    assert "Prompt: a fox" in out and "Negative prompt: ugly" in out and "Seed: 9" in out
    rc, out, _ = _run(capsys, path, "--json")
    data = json.loads(out)
    assert data["source"] == "comfyui" and "ComfyUI workflow" in data["note"]
    assert data["fields"]["Prompt"] == "a fox" and "params" not in data


def test_missing_file_and_no_parameters_fail_clearly(tmp_path, capsys):
    rc, out, err = _run(capsys, tmp_path / "nope.png")
    assert rc != 0 and out == "" and "not found" in err and "nope.png" in err
    rc, out, err = _run(capsys, _png(tmp_path / "plain.png", None))
    assert rc != 0 and out == "" and "no generation parameters" in err and "plain.png" in err
    (tmp_path / "junk.png").write_bytes(b"not an image")
    rc, _, err = _run(capsys, tmp_path / "junk.png")
    assert rc != 0 and "Cannot read" in err and "Traceback" not in err


def test_console_script(tmp_path):
    path = _png(tmp_path / "a.png", A1111)
    proc = subprocess.run([str(MLSD_BIN), "info", path, "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"]["seed"] == 42
