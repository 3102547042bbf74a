"""Every LoRA that cannot be applied fails loudly, names the file, says why and how to fix it."""

from __future__ import annotations

import copy

import pytest
import torch

from mlsd.errors import InputFileError, LoraError
from mlsd.lora import LoraSpec, apply_loras
from tests.lora_fixtures import (
    UNET_LINEAR,
    kohya_stem,
    single_thread,  # noqa: F401  (autouse: one torch thread)
    tiny_text_encoder,
    tiny_unet,
    write_lora,
)

TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def sd1_unet():
    return tiny_unet(cross_attention_dim=768)  # SD1's cross-attention width, so family hints can be checked


def _lin(out_f: int, in_f: int, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(out_f + in_f)
    return {"lora_down.weight": torch.randn(rank, in_f, generator=g),
            "lora_up.weight": torch.randn(out_f, rank, generator=g), "alpha": torch.tensor(1.0)}


def _raises(unet, te, path, *, weight=1.0, te_weight=None, error=LoraError) -> str:
    before = copy.deepcopy(unet.state_dict())
    with pytest.raises(error) as info:
        apply_loras(unet, te, [LoraSpec(path, weight, te_weight)])
    after = unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # nothing half-merged
    assert info.value.where == str(path) and info.value.fix
    return info.value.what


def test_unknown_modules_are_listed_with_a_count(sd1_unet, tmp_path):
    entries = {f"lora_unet_down_blocks_7_attentions_0_proj_{i}": _lin(8, 8) for i in range(12)}
    entries[kohya_stem("lora_unet_", UNET_LINEAR[0])] = _lin(64, 64)
    what = _raises(sd1_unet, None, write_lora(tmp_path / "x.safetensors", entries))
    assert "12 of 13 modules" in what and "lora_unet_down_blocks_7_attentions_0_proj_0" in what
    assert "and 2 more" in what and "cannot tell" in what


def test_sd2_lora_on_sd1_model_is_another_family(sd1_unet, tmp_path):
    entries = {kohya_stem("lora_unet_", TO_K): _lin(64, 1024)}  # SD2's OpenCLIP context is 1024 wide
    what = _raises(sd1_unet, None, write_lora(tmp_path / "sd2.safetensors", entries))
    assert "another model family" in what and "(SD1)" in what and "SD2" in what and "1024" in what


def test_metadata_names_the_family_when_shapes_cannot(sd1_unet, tmp_path):
    entries = {kohya_stem("lora_unet_", "down_blocks.3.attentions.0.proj_in"): _lin(64, 64)}
    path = write_lora(tmp_path / "m.safetensors", entries, {"ss_base_model_version": "sd_v2_768_v"})
    assert "made for SD2" in _raises(sd1_unet, None, path)


@pytest.mark.parametrize("how", ["te1_keys", "metadata", "width_2048"])
def test_sdxl_lora_on_sd1_is_refused(sd1_unet, tmp_path, how):
    entries, md = {kohya_stem("lora_unet_", UNET_LINEAR[0]): _lin(64, 64)}, None
    if how == "te1_keys":
        entries["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = _lin(768, 768)
    elif how == "metadata":
        md = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    else:
        entries[kohya_stem("lora_unet_", TO_K)] = _lin(64, 2048)
    what = _raises(sd1_unet, None, write_lora(tmp_path / "xl.safetensors", entries, md))
    assert "SDXL LoRA" in what and "this model is SD1" in what


def test_text_encoder_lora_without_text_encoder(sd1_unet, tmp_path):
    entries = {"lora_te_text_model_encoder_layers_0_mlp_fc1": _lin(37, 32)}
    assert "no text encoder was given" in _raises(sd1_unet, None, write_lora(tmp_path / "t.safetensors", entries))


def test_text_encoder_shapes_are_checked_too(sd1_unet, tmp_path):
    te = tiny_text_encoder()
    entries = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": _lin(1024, 1024)}
    what = _raises(sd1_unet, te, write_lora(tmp_path / "t.safetensors", entries))
    assert "another model family" in what and "SD2" in what  # a 1024-wide text encoder is SD2's


def test_a_bad_file_later_in_the_list_leaves_models_untouched(sd1_unet, tmp_path):
    good = write_lora(tmp_path / "good.safetensors", {kohya_stem("lora_unet_", UNET_LINEAR[0]): _lin(64, 64)})
    bad = write_lora(tmp_path / "bad.safetensors", {kohya_stem("lora_unet_", TO_K): _lin(64, 1024)})
    before = copy.deepcopy(sd1_unet.state_dict())
    with pytest.raises(LoraError):
        apply_loras(sd1_unet, None, [LoraSpec(good), LoraSpec(bad)])
    after = sd1_unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("suffixes, message", [
    ({"lora_down.weight": torch.zeros(4, 64), "lora_up.weight": torch.zeros(64, 4), "dora_scale": torch.ones(64, 1)},
     "uses DoRA"),
    ({"lora_down.weight": torch.zeros(4, 64)}, "incomplete or mixed"),
    ({"lora_down.weight": torch.full((4, 64), float("nan")), "lora_up.weight": torch.zeros(64, 4)}, "NaN"),
    ({"lora_down.weight": torch.zeros(4, 64), "hada_w1_a": torch.zeros(64, 4)}, "incomplete or mixed"),
    ({"lora_down.weight": torch.zeros(3, 64), "lora_up.weight": torch.zeros(64, 4)}, "different ranks"),
    ({"lora_down.weight": torch.zeros(4, 64), "lora_up.weight": torch.zeros(64, 4), "alpha": torch.ones(2)},
     "not a single number"),
    ({"hada_w1_a": torch.zeros(64, 2), "hada_w1_b": torch.zeros(2, 64), "hada_w2_a": torch.zeros(64, 2),
      "hada_w2_b": torch.zeros(2, 32)}, "Hadamard factors differ"),
])
def test_malformed_modules(sd1_unet, tmp_path, suffixes, message):
    path = write_lora(tmp_path / "m.safetensors", {kohya_stem("lora_unet_", UNET_LINEAR[0]): suffixes})
    assert message in _raises(sd1_unet, None, path)


def test_keys_in_no_known_layout(sd1_unet, tmp_path):
    path = write_lora(tmp_path / "u.safetensors", {"some_model": {"weight": torch.zeros(2)}})
    assert "no known LoRA layout: some_model.weight" in _raises(sd1_unet, None, path)


def test_non_linear_target_and_duplicate_spellings(sd1_unet, tmp_path):
    norm = {kohya_stem("lora_unet_", "down_blocks.1.attentions.0.norm"): _lin(64, 64)}
    assert "GroupNorm" in _raises(sd1_unet, None, write_lora(tmp_path / "n.safetensors", norm))
    dup = {"lora_unet_conv_in": _lin(32, 4), "lora_unet_input_blocks_0_0": _lin(32, 4)}
    assert "two entries for the same module conv_in" in _raises(sd1_unet, None, write_lora(tmp_path / "d.st", dup))


def test_missing_and_corrupt_files(sd1_unet, tmp_path):
    _raises(sd1_unet, None, tmp_path / "nope.safetensors", error=InputFileError)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _raises(sd1_unet, None, bad, error=InputFileError)
