"""`mlsd samplers`, `inspect`, `models`, `demo` and where the models directory comes from, as users run them.

The models directory is laid out as A1111's (``Stable-diffusion/`` with sidecar ``.yaml``, ``Lora/``,
``VAE/``) and filled with tiny seeded models; ``lay_out_models`` is shared with ``test_cli_generate``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlsd.cli import main
from tests.lora_fixtures import single_thread, write_lora  # noqa: F401  (autouse: one torch thread)

ALL_SAMPLERS = [
    "Euler", "Euler a", "LMS", "LMS Karras", "Heun", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras",
    "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras",
    "DDIM", "PLMS", "UniPC",
]
# Two modules of the tiny SD1 model (diffusers names): a UNet cross-attention key and a text-encoder query.
LORA_TARGETS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 64),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64),
}


def sha10(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def isolate_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No user settings, hash cache or MLSD_MODELS_DIR from the machine running the tests."""
    mp.setenv("XDG_CACHE_HOME", str(home / "cache"))
    mp.setenv("XDG_CONFIG_HOME", str(home / "config"))
    mp.setenv("MLSD_SETTINGS", str(home / "no-settings.toml"))
    mp.delenv("MLSD_MODELS_DIR", raising=False)


def write_style_lora(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    entries = {stem: {"lora_down.weight": torch.randn(4, fan_in, generator=g) * 0.5,
                      "lora_up.weight": torch.randn(fan_out, 4, generator=g) * 0.5,
                      "alpha": torch.tensor(4.0)}
               for stem, (fan_out, fan_in) in LORA_TARGETS.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_lora(path, entries, {"ss_network_dim": "4"})


def lay_out_models(root: Path, tiny_checkpoints, *, inpainting: bool = False) -> Path:
    """Stable-diffusion/tiny{,-inpaint}.safetensors (+ .yaml), Lora/style, VAE/tinyvae (.safetensors)."""
    sd = root / "Stable-diffusion"
    sd.mkdir(parents=True)
    for name, inpaint in (("tiny", False), ("tiny-inpaint", True))[: 2 if inpainting else 1]:
        src, _ = tiny_checkpoints("sd1", inpainting=inpaint)
        shutil.copy(src, sd / f"{name}.safetensors")
        shutil.copy(src.with_suffix(".yaml"), sd / f"{name}.yaml")
    write_style_lora(root / "Lora" / "style.safetensors")
    # A standalone VAE as A1111 keeps them: another model's first_stage_model.* keys, prefix stripped.
    other = tiny_checkpoints("sd1", seed=7)[1].ldm
    (root / "VAE").mkdir()
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in other.items()
               if k.startswith("first_stage_model.")}, str(root / "VAE" / "tinyvae.safetensors"))
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        isolate_env(mp, home)
        yield lay_out_models(tmp_path_factory.mktemp("a1111") / "models", tiny_checkpoints)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, tmp_path_factory):
    isolate_env(monkeypatch, tmp_path_factory.mktemp("home"))  # outside tmp_path: tests list what is there
    monkeypatch.chdir(tmp_path)


# ---- samplers ----------------------------------------------------------------------------------------------


def test_samplers_lists_all_18_names(capsys):
    rc, out, err = run_cli(capsys, "samplers")
    assert rc == 0 and err == ""
    names = [line[:22].rstrip() for line in out.splitlines()]
    assert names == ALL_SAMPLERS
    assert sum("(default)" in line for line in out.splitlines()) == 1
    rc, out, _ = run_cli(capsys, "samplers", "--json")
    assert rc == 0 and list(json.loads(out)) == ALL_SAMPLERS


# ---- inspect -----------------------------------------------------------------------------------------------


def test_inspect_checkpoint_by_name_and_json_by_path(models, capsys):
    ckpt = models / "Stable-diffusion" / "tiny.safetensors"
    rc, out, err = run_cli(capsys, "inspect", "tiny", "--models-dir", models)
    assert rc == 0 and err == ""
    assert "Stable Diffusion 1.x" in out and "epsilon" in out and sha10(ckpt) in out
    assert "sidecar yaml" in out  # the prediction type came from tiny.yaml, and it says so

    rc, out, _ = run_cli(capsys, "inspect", "--json", ckpt)
    info = json.loads(out)
    assert rc == 0
    assert info["kind"] == "checkpoint" and info["family"] == "sd1" and info["inpainting"] is False
    assert info["prediction_type"] == "epsilon" and info["prediction_source"] == "sidecar yaml"
    assert info["short_hash"] == sha10(ckpt)
    assert info["size_bytes"] == ckpt.stat().st_size
    assert set(info["components"]) == {"unet", "text_encoder", "vae"}
    params = info["parameters"]
    assert params["unet"] > 0 and params["text_encoder"] > 0 and params["vae"] > 0 and params["ema"] == 0

    rc, out, _ = run_cli(capsys, "inspect", "--json", "--no-hash", ckpt)
    assert rc == 0 and "short_hash" not in json.loads(out)


def test_inspect_lora_and_vae(models, capsys):
    rc, out, _ = run_cli(capsys, "inspect", "--json", "style", "--models-dir", models)
    lora = json.loads(out)
    assert rc == 0 and lora["kind"] == "lora" and lora["format"] == "lora"
    assert lora["ranks"] == {"4": 2}  # both modules are rank 4 (JSON keys are strings)
    assert lora["modules"] == {"unet": 1, "text_encoder": 1}
    assert len(lora["short_hash"]) == 12

    rc, out, err = run_cli(capsys, "inspect", "style", "--models-dir", models)
    assert rc == 0 and "lora" in out and "text_encoder: 1" in out and "unet: 1" in out

    vae_path = models / "VAE" / "tinyvae.safetensors"
    rc, out, _ = run_cli(capsys, "inspect", "--json", vae_path)
    vae = json.loads(out)
    assert rc == 0 and vae["kind"] == "vae" and vae["parameters"]["vae"] > 0
    assert vae["size_bytes"] == vae_path.stat().st_size
    rc, out, _ = run_cli(capsys, "inspect", "tinyvae", "--models-dir", models)  # by name, from models/VAE
    assert rc == 0 and "vae" in out


def test_inspect_unknown_name_lists_what_is_there(models, capsys):
    rc, out, err = run_cli(capsys, "inspect", "nothing-like-this", "--models-dir", models)
    assert rc == 2 and out == ""
    assert err.startswith("error: Model not found:") and "nothing-like-this" in err
    assert "tiny" in err and "--models-dir" in err


# ---- models and where the models directory comes from ------------------------------------------------------


def test_models_json_lists_checkpoints_loras_and_vaes(models, capsys):
    rc, out, err = run_cli(capsys, "models", "--json", "--models-dir", models)
    assert rc == 0 and err == ""
    data = json.loads(out)
    assert data["models_dir"] == str(models) and data["source"] == "option"
    (ckpt,) = data["checkpoint"]
    assert ckpt["name"] == "tiny.safetensors" and ckpt["family"] == "sd1" and ckpt["kind"] == "checkpoint"
    assert ckpt["prediction_type"] == "epsilon" and ckpt["inpainting"] is False
    assert Path(ckpt["path"]) == models / "Stable-diffusion" / "tiny.safetensors"
    (lora,) = data["lora"]
    assert lora["name"] == "style.safetensors" and lora["kind"] == "lora" and lora["format"] == "lora"
    (vae,) = data["vae"]
    assert vae["name"] == "tinyvae.safetensors" and vae["kind"] == "vae"
    assert data["coreml"] == []

    rc, out, _ = run_cli(capsys, "models", "--models-dir", models)  # the human listing
    assert rc == 0
    assert "tiny.safetensors" in out and "style.safetensors" in out and "tinyvae.safetensors" in out


def _models_source(capsys, *extra) -> tuple[str, str]:
    rc, out, err = run_cli(capsys, "models", "--json", *extra)
    assert rc == 0, err
    data = json.loads(out)
    return data["models_dir"], data["source"]


def test_models_dir_precedence_option_env_settings_default(tmp_path, monkeypatch, capsys):
    for d in ("from-option", "from-env", "from-settings"):
        (tmp_path / d / "Stable-diffusion").mkdir(parents=True)
    assert _models_source(capsys) == ("models", "default")  # nothing configured: ./models

    settings = tmp_path / "settings.toml"
    settings.write_text(f'models_dir = "{tmp_path / "from-settings"}"\n', encoding="utf-8")
    monkeypatch.setenv("MLSD_SETTINGS", str(settings))
    assert _models_source(capsys) == (str(tmp_path / "from-settings"), "settings")

    monkeypatch.setenv("MLSD_MODELS_DIR", str(tmp_path / "from-env"))
    assert _models_source(capsys) == (str(tmp_path / "from-env"), "MLSD_MODELS_DIR")

    assert _models_source(capsys, "--models-dir", tmp_path / "from-option") == (
        str(tmp_path / "from-option"), "option")


def test_settings_file_models_dir_is_used_for_name_resolution(models, tmp_path, monkeypatch, capsys):
    settings = tmp_path / "settings.toml"
    settings.write_text(f"models_dir = {json.dumps(str(models))}\n", encoding="utf-8")
    monkeypatch.setenv("MLSD_SETTINGS", str(settings))
    rc, out, err = run_cli(capsys, "inspect", "--json", "--no-hash", "tiny")
    assert rc == 0, err
    assert Path(json.loads(out)["path"]) == models / "Stable-diffusion" / "tiny.safetensors"


def test_broken_settings_file_is_a_clean_error(tmp_path, monkeypatch, capsys):
    settings = tmp_path / "settings.toml"
    settings.write_text("models_dir = [unclosed\n", encoding="utf-8")
    monkeypatch.setenv("MLSD_SETTINGS", str(settings))
    rc, out, err = run_cli(capsys, "models")
    assert rc == 2 and out == ""
    assert "not valid TOML" in err and str(settings) in err and "Traceback" not in err


# ---- --debug -----------------------------------------------------------------------------------------------


def test_debug_shows_traceback_only_when_asked(models, capsys):
    argv = ["inspect", "no-such-model", "--models-dir", models]
    rc, _, plain = run_cli(capsys, *argv)
    rc_debug, _, debug = run_cli(capsys, *argv, "--debug")
    assert rc == rc_debug == 2
    assert "Traceback" not in plain and "Traceback (most recent call last)" in debug
    assert plain.strip() in debug  # the same message, with the traceback before it
    assert "ModelNotFoundError" in debug


def test_internal_error_exits_1_with_hint_and_traceback_under_debug(models, monkeypatch, capsys):
    import mlsd.describe

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(mlsd.describe, "describe", broken)
    rc, out, err = run_cli(capsys, "inspect", "tiny", "--models-dir", models)
    assert rc == 1 and out == ""
    assert "internal error: RuntimeError: simulated bug" in err
    assert "--debug" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "inspect", "tiny", "--models-dir", models, "--debug")
    assert rc == 1 and "Traceback (most recent call last)" in err and "simulated bug" in err


# ---- demo --------------------------------------------------------------------------------------------------


def test_demo_installs_the_model_once_and_checks_its_images(tmp_path, monkeypatch, capsys):
    import mlsd.pipeline.request as request_module

    # The demo draws 64x64 in 20 steps; shrink only the request it builds (2 steps),
    # so the install, the load, the sampling loop, the reading and the A1111 save all run for real, quickly.
    real_request = request_module.GenerationRequest

    def small_request(**kw):
        return real_request(**{**kw, "steps": 2, "width": 64, "height": 64})

    monkeypatch.setattr(request_module, "GenerationRequest", small_request)
    models_dir, out_dir = tmp_path / "m", tmp_path / "o"
    rc, out, err = run_cli(capsys, "demo", "--models-dir", models_dir, "--output-dir", out_dir, "--no-coreml",
                           "--prompt", "a red circle on a blue background")
    assert rc == 0, err
    assert "prompt 'a red circle on a blue background', seed 1; it reads as" in out
    assert "images read as their prompts" in out
    model = models_dir / "Stable-diffusion" / "mlsd-demo-shapes.safetensors"
    assert model.is_file() and model.with_suffix(".yaml").is_file()
    assert not list(model.parent.glob(".*partial*"))  # the temp names are gone
    images = sorted(out_dir.glob("txt2img-images/*/*.png"))
    assert [p.name for p in images] == ["00000-1.png"] and f"image: {images[0]}" in out
    stamp = (model.stat().st_mtime_ns, model.with_suffix(".yaml").stat().st_mtime_ns)
    rc, out, err = run_cli(capsys, "demo", "--models-dir", models_dir, "--output-dir", out_dir, "--seed", "3", "--no-coreml")
    assert rc == 0, err
    assert (model.stat().st_mtime_ns, model.with_suffix(".yaml").stat().st_mtime_ns) == stamp
    # the default: four prompts, one image each
    assert sorted(p.name for p in out_dir.glob("txt2img-images/*/*.png")) == [
        "00000-1.png", "00001-3.png", "00002-3.png", "00003-3.png", "00004-3.png"]
    assert out.count("it reads as") == 4

    from mlsd.infotext import read_image_parameters

    text = read_image_parameters(images[0]).raw
    assert "Model: mlsd-demo-shapes" in text and f"Model hash: {sha10(model)}" in text
