"""Parsing (formats, metadata, alphas), original-LDM name mapping and the ΔW math on its own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsd.lora import LoraModule, delta_weight, parse_lora, read_lora_file
from mlsd.lora.names import ModuleIndex, lora_family
from tests.lora_fixtures import (
    single_thread,  # noqa: F401  (autouse: one torch thread)
    tiny_unet,
    write_lora,
)


def _lin(out_f=8, in_f=8, rank=2):
    return {"lora_down.weight": torch.randn(rank, in_f), "lora_up.weight": torch.randn(out_f, rank)}


def test_metadata_summary_and_format_per_module(tmp_path):
    entries = {
        "lora_unet_a": {**_lin(), "alpha": torch.tensor(1.0, dtype=torch.bfloat16)},
        "lora_unet_b": {"lora_down.weight": torch.randn(2, 8, 3, 3), "lora_up.weight": torch.randn(8, 2, 1, 1)},
        "lora_unet_c": {k: torch.randn(2, 2) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
        "lora_te_d": {"lokr_w1": torch.randn(2, 2), "lokr_w2_a": torch.randn(4, 1), "lokr_w2_b": torch.randn(1, 4)},
        "unet.e.f": {"lora_A.weight": torch.randn(2, 8), "lora_B.weight": torch.randn(8, 2)},
        "text_encoder.g": {"lora.down.weight": torch.randn(2, 8), "lora.up.weight": torch.randn(8, 2)},
    }
    md = {"ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "8.0",
          "ss_base_model_version": "sd_v1", "ss_v2": "False", "sshs_model_hash": "abc", "ss_output_name": "x"}
    lora = read_lora_file(write_lora(tmp_path / "x.safetensors", entries, md))
    fmt = {(m.target, m.name): m.format for m in lora.modules}
    assert fmt == {("unet", "a"): "lora", ("unet", "b"): "locon", ("unet", "c"): "loha",
                   ("text_encoder", "d"): "lokr", ("unet", "e.f"): "peft", ("text_encoder", "g"): "diffusers"}
    s = lora.summary
    assert (s.network_module, s.network_dim, s.network_alpha, s.base_model_version, s.v2, s.model_hash,
            s.output_name) == ("networks.lora", "16", "8.0", "sd_v1", False, "abc", "x")
    assert next(m for m in lora.modules if m.name == "a").alpha == 1.0
    assert lora_family(lora)[0] == "SD1"


def test_peft_alpha_from_diffusers_metadata_with_patterns_and_rslora(tmp_path):
    peft = {"lora_A.weight": torch.randn(4, 8), "lora_B.weight": torch.randn(8, 4)}
    entries = {f"unet.{n}": peft for n in ("blk.to_q", "blk.to_k", "other.to_k")}
    md = {"lora_adapter_metadata": '{"unet.lora_alpha": 8, "unet.alpha_pattern": {"blk.to_k": 2},'
                                   ' "unet.use_rslora": true}'}
    alphas = {m.name: m.alpha for m in read_lora_file(write_lora(tmp_path / "p.safetensors", entries, md)).modules}
    # rsLoRA scales by alpha/sqrt(r); mlsd keeps alpha/r, so alpha is stored times sqrt(r) = 2
    assert alphas == {"blk.to_q": 16.0, "blk.to_k": 4.0, "other.to_k": 16.0}


def test_bundled_embeddings_are_kept_out_and_reported(tmp_path):
    entries = {"lora_unet_a": _lin(), "bundle_emb.mytoken": {"string_to_param.*": torch.randn(1, 8)}}
    lora = read_lora_file(write_lora(tmp_path / "b.safetensors", entries))
    assert lora.ignored_keys == ["bundle_emb.mytoken.string_to_param.*"] and len(lora.modules) == 1


def test_pickled_lora_goes_through_the_safe_loader(tmp_path):
    pytest.importorskip("mlsd.checkpoints.safe_pickle")
    path = tmp_path / "old.pt"
    torch.save({"lora_unet_a.lora_down.weight": torch.randn(2, 8), "lora_unet_a.lora_up.weight": torch.randn(8, 2),
                "lora_unet_a.alpha": torch.tensor(2.0)}, path)
    (m,) = read_lora_file(path).modules
    assert (m.name, m.format, m.alpha) == ("a", "lora", 2.0)


def test_ldm_names_follow_the_sd1_block_layout():
    # The SD1 layout: 4 down blocks (last without attention), 12 input / 12 output blocks.
    index = ModuleIndex.build(tiny_unet(blocks=4), is_unet=True)
    expected = {
        "input_blocks_0_0": "conv_in", "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks_10_0_in_layers_2": "down_blocks.3.resnets.0.conv1",
        "input_blocks_11_0_emb_layers_1": "down_blocks.3.resnets.1.time_emb_proj",
        "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
        "middle_block_1_transformer_blocks_0_attn2_to_v": "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",  # no attention in that block
        "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks_11_1_transformer_blocks_0_ff_net_2": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
        "time_embed_2": "time_embedding.linear_2", "out_2": "conv_out",
    }
    assert {k: index.underscored.get(k) for k in expected} == expected
    # Every mergeable layer has exactly one LDM spelling, besides its diffusers one.
    layers = {n for n, m in index.modules.items() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    ldm = [v for k, v in index.underscored.items() if k.startswith(
        ("input_blocks_", "middle_block_", "output_blocks_", "out_", "time_embed_"))
           and v in layers]
    assert sorted(ldm) == sorted(layers)


def _module(fmt: str, tensors: dict, alpha=None) -> LoraModule:
    return LoraModule("m", "unet", "m", False, fmt, tensors, alpha)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.sampled_from([1, 3]), st.integers(1, 2),
       st.one_of(st.none(), st.floats(0.25, 64)), st.integers(0, 2**16))
def test_conv_lora_delta_equals_composed_convs(rank, cin, cout, k, stride, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(rank, cin, k, k, generator=g), torch.randn(cout, rank, 1, 1, generator=g)
    x = torch.randn(1, cin, 7, 7, generator=g)
    dw = delta_weight(_module("locon", {"down": down, "up": up}, alpha), (cout, cin, k, k))
    scale = alpha / rank if alpha else 1.0
    want = scale * F.conv2d(F.conv2d(x, down, stride=stride, padding=k // 2), up)
    torch.testing.assert_close(F.conv2d(x, dw, stride=stride, padding=k // 2), want, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_lokr_delta_is_the_kronecker_product(om, im, ok, inn, seed):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(om, im, generator=g), torch.randn(ok, inn, generator=g)
    dw = delta_weight(_module("lokr", {"lokr_w1": w1, "lokr_w2": w2}, alpha=99.0), (om * ok, im * inn))
    for a, b, c, d in [(0, 0, 0, 0), (om - 1, ok - 1, im - 1, inn - 1), (om // 2, ok // 2, im - 1, 0)]:
        assert math.isclose(dw[a * ok + b, c * inn + d].item(), (w1[a, c] * w2[b, d]).item(), rel_tol=1e-6)


def test_missing_alpha_means_alpha_equals_rank_and_mismatch_raises():
    t = {"down": torch.randn(3, 5), "up": torch.randn(4, 3)}
    torch.testing.assert_close(delta_weight(_module("lora", t), (4, 5)), t["up"] @ t["down"])
    torch.testing.assert_close(delta_weight(_module("lora", t), (4, 5, 1, 1)), (t["up"] @ t["down"])[..., None, None])
    with pytest.raises(Exception, match=r"gives a \(4, 5\) update but the model's weight is \(4, 6\)"):
        delta_weight(_module("lora", t), (4, 6))


def test_parse_is_pure_and_names_the_file(tmp_path):
    lora = parse_lora({"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight":
                       torch.zeros(2, 1)}, {}, tmp_path / "mem.safetensors")
    assert lora.formats == ("lora",) and lora.modules[0].key == "lora_unet_x"
    with pytest.raises(Exception) as info:
        parse_lora({}, {}, tmp_path / "empty.safetensors")
    assert "contains no LoRA weights" in str(info.value) and "empty.safetensors" in str(info.value)

