"""Every bad input gets one clear message: what, which file, how to fix."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mlsd.checkpoints.detect import detect
from mlsd.checkpoints.load import load_model
from mlsd.checkpoints.read import read_weights
from mlsd.errors import InputFileError, UnknownModelError, UnsupportedModelError


def _messages(e: pytest.ExceptionInfo, path) -> str:
    text = str(e.value)
    assert str(path) in text, "the message must name the file"
    assert "fix:" in text, "the message must say how to fix it"
    return text


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(InputFileError, match="not found") as e:
        read_weights(path)
    _messages(e, path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(InputFileError, match="empty") as e:
        read_weights(path)
    _messages(e, path)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputFileError, match="truncated") as e:
        read_weights(path)
    _messages(e, path)


@pytest.mark.parametrize("header", [b"{not json", b"[1, 2]"])
def test_bad_safetensors_header(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(InputFileError, match="header") as e:
        read_weights(path)
    _messages(e, path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InputFileError, match="does not fit") as e:
        read_weights(path)
    _messages(e, path)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(100))
    with pytest.raises(InputFileError, match="Unknown file type") as e:
        read_weights(path)
    _messages(e, path)


def test_random_bytes_with_ckpt_suffix(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputFileError) as e:
        read_weights(path)
    _messages(e, path)


def test_unknown_architecture_lists_fingerprints(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"backbone.layer1.weight": torch.zeros(2), "head.fc.bias": torch.zeros(2)}, str(path))
    with pytest.raises(UnknownModelError) as e:
        load_model(path)
    text = _messages(e, path)
    assert "backbone.layer1" in text and "head.fc" in text


@pytest.mark.parametrize("key,name", [
    ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", "SDXL"),
    ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
])
def test_newer_families_are_recognised_not_unknown(key, name):
    with pytest.raises(UnsupportedModelError, match=name):
        detect({key: torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 3, 3)})


def test_lora_passed_as_model_says_so(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    with pytest.raises(InputFileError, match="LORA") as e:
        load_model(path)
    assert "--lora" in _messages(e, path)


def test_mixed_family_checkpoint_is_refused(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    sd1, _ = tiny_checkpoints("sd1")
    tensors = load_file(str(sd1))
    key = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 1024)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UnknownModelError, match="1024 wide"):
        load_model(path)


def test_diffusers_folder_without_index(tmp_path):
    with pytest.raises(InputFileError, match="model_index.json"):
        load_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({}))
    with pytest.raises(InputFileError, match="incomplete"):
        load_model(tmp_path)
