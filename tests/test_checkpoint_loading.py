"""Loading single files and folders: exact weights, families, EMA, VAE swap, offline."""

from __future__ import annotations

import pytest
import torch

from mlsd.checkpoints.load import load_model, swap_vae
from mlsd.errors import InputFileError, UnknownModelError, UsageError


def _te_keys(state: dict) -> dict:
    """transformers 5 flattened CLIPTextModel's names; compare in the canonical 'text_model.' form."""
    return {("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in state.items() if not k.endswith("position_ids")}


def assert_same_weights(model, tiny, *, exact_dtype: bool = True):
    for name, source, module in (("unet", tiny.unet, model.unet), ("vae", tiny.vae, model.vae),
                                 ("text_encoder", tiny.text_encoder, model.text_encoder)):
        loaded = _te_keys(module.state_dict()) if name == "text_encoder" else module.state_dict()
        assert set(loaded) == set(source), f"{name}: key sets differ"
        for key, value in source.items():
            got = loaded[key]
            want = value.to(got.dtype) if not exact_dtype else value
            # LDM stores the VAE mid-attention as 1x1 convs; values must be identical element for element.
            assert torch.equal(got.flatten(), want.flatten().to(got.dtype)), f"{name}.{key} differs"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("inpainting", [False, True])
def test_safetensors_loads_exact_weights(tiny_checkpoints, family, inpainting):
    path, tiny = tiny_checkpoints(family, inpainting)
    model = load_model(path)
    assert model.family.name == family
    assert model.inpainting is inpainting
    assert model.unet.config.in_channels == (9 if inpainting else 4)
    assert_same_weights(model, tiny)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_keep_their_dtype_exactly(tiny_checkpoints, dtype):
    path, tiny = tiny_checkpoints("sd1", dtype=dtype)
    model = load_model(path, dtype=None)
    assert next(model.unet.parameters()).dtype == dtype
    assert model.source_dtype == dtype
    for name, source, module in (("unet", tiny.unet, model.unet), ("vae", tiny.vae, model.vae)):
        loaded = module.state_dict()
        for key, value in source.items():
            assert torch.equal(loaded[key].flatten(), value.to(dtype).flatten()), f"{name}.{key}"


@pytest.mark.parametrize("nest", [False, True])
def test_ckpt_pickle_loads_exact_weights(tiny_checkpoints, nest):
    path, tiny = tiny_checkpoints("sd1", suffix=".ckpt", nest_state_dict=nest)
    assert_same_weights(load_model(path), tiny)


def test_sd2_ckpt(tiny_checkpoints):
    path, tiny = tiny_checkpoints("sd2", suffix=".ckpt", nest_state_dict=True)
    model = load_model(path)
    assert model.family.name == "sd2" and model.prediction_type == "v_prediction"
    assert_same_weights(model, tiny)


def test_sd2_drops_last_text_block_and_pads_with_exclamation(tiny_checkpoints):
    path, tiny = tiny_checkpoints("sd2")
    model = load_model(path)
    from mlsd.demo.tiny import TEXT_LAYERS

    assert model.text_encoder.config.num_hidden_layers == TEXT_LAYERS  # file holds TEXT_LAYERS + 1 blocks
    assert model.tokenizer.pad_token == "!" and model.tokenizer.pad_token_id == 0
    sd1 = load_model(tiny_checkpoints("sd1")[0])
    assert sd1.tokenizer.pad_token_id == 49407


def test_ema_is_ignored_unless_asked(tiny_checkpoints):
    path, tiny = tiny_checkpoints("sd1", ema=True)
    live = load_model(path)
    assert_same_weights(live, tiny)
    ema = load_model(path, use_ema=True)
    for key, value in tiny.unet.items():
        assert torch.equal(ema.unet.state_dict()[key], value + 0.01), key


def test_ema_flag_without_ema_weights_is_an_error(tiny_checkpoints):
    with pytest.raises(UsageError, match="no EMA weights"):
        load_model(tiny_checkpoints("sd1")[0], use_ema=True)


def test_prediction_type_sources(tiny_checkpoints, tmp_path):
    path, _ = tiny_checkpoints("sd2")
    assert load_model(path).prediction_source == "sidecar yaml"
    import yaml

    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    assert config["model"]["params"].pop("parameterization") == "v"
    copy = tmp_path / "eps.safetensors"
    copy.write_bytes(path.read_bytes())
    copy.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    model = load_model(copy)
    assert (model.prediction_type, model.prediction_source) == ("epsilon", "sidecar yaml")
    assert model.scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(UsageError, match="Unknown prediction type"):
        load_model(copy, prediction_type="x0")


def test_non_standard_size_without_sidecar_says_how_to_fix(tiny_checkpoints, tmp_path):
    path, _ = tiny_checkpoints("sd1")
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(path.read_bytes())
    with pytest.raises(UnknownModelError, match="do not fit") as e:
        load_model(bare)
    assert ".yaml beside it" in str(e.value)


def test_broken_sidecar_yaml_is_named(tiny_checkpoints, tmp_path):
    path, _ = tiny_checkpoints("sd1")
    copy = tmp_path / "m.safetensors"
    copy.write_bytes(path.read_bytes())
    copy.with_suffix(".yaml").write_text("model: [unclosed")
    with pytest.raises(InputFileError, match="sidecar config") as e:
        load_model(copy)
    assert "m.yaml" in str(e.value)


def test_diffusers_folder_gives_the_same_modules(tiny_checkpoints, tmp_path):
    path, tiny = tiny_checkpoints("sd1")
    model = load_model(path)
    folder = tmp_path / "diffusers"
    for name in ("unet", "vae", "text_encoder"):
        getattr(model, name).save_pretrained(folder / name)
    (folder / "model_index.json").write_text("{}")
    again = load_model(folder)
    assert again.family.name == "sd1"
    assert_same_weights(again, tiny)


@pytest.mark.parametrize("prefixed", [True, False])
def test_vae_file_swaps_in(tiny_checkpoints, tmp_path, prefixed):
    from safetensors.torch import save_file

    path, tiny = tiny_checkpoints("sd1")
    other = tiny_checkpoints("sd1", seed=7)[1]
    vae_sd = {k if prefixed else k.removeprefix("first_stage_model."): v
              for k, v in other.ldm.items() if k.startswith("first_stage_model.")}
    vae_file = tmp_path / "vae-ft-mse.safetensors"
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(vae_file))
    model = load_model(path, vae=vae_file)
    assert model.vae_source == vae_file
    for key, value in other.vae.items():
        assert torch.equal(model.vae.state_dict()[key].flatten(), value.flatten()), key
    for key, value in tiny.unet.items():  # the rest is untouched
        assert torch.equal(model.unet.state_dict()[key], value)


def test_non_vae_file_as_vae_is_refused(tiny_checkpoints, tmp_path):
    from safetensors.torch import save_file

    path, _ = tiny_checkpoints("sd1")
    junk = tmp_path / "notvae.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(junk))
    model = load_model(path)
    with pytest.raises(InputFileError, match="no VAE weights"):
        swap_vae(model, junk)


def test_loading_is_offline(tiny_checkpoints, no_network):
    path, tiny = tiny_checkpoints("sd2", suffix=".ckpt")
    model = load_model(path)
    ids = model.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
