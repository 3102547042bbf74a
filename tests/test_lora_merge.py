"""Merged weights must reproduce the unmerged (forward-hook) LoRA output for every format."""

from __future__ import annotations

import copy

import pytest
import torch

from mlsd.lora import LoraSpec, apply_loras
from tests.lora_fixtures import (
    TE_PARTIAL,
    UNET_CONV1,
    UNET_CONV3,
    UNET_LINEAR,
    Piece,
    hooked,
    kohya_stem,
    loha_piece,
    lokr_piece,
    lora_piece,
    single_thread,  # noqa: F401  (autouse: one torch thread)
    te_out,
    tiny_text_encoder,
    tiny_unet,
    unet_out,
    write_lora,
)

ATOL, MARGIN = 1e-5, 1e-2  # agreement tolerance vs. the least a real LoRA must move the output


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def te():
    return tiny_text_encoder()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_unet(unet, pieces: dict[str, Piece], path, weight: float = 1.0, stem=None, **md):
    stem = stem or (lambda n: kohya_stem("lora_unet_", n))
    write_lora(path, {stem(n): p for n, p in pieces.items()}, md or None)
    with hooked(unet, [(n, p.delta, weight) for n, p in pieces.items()]):
        want = unet_out(unet)
    merged = copy.deepcopy(unet)
    report = apply_loras(merged, None, [LoraSpec(path, unet_weight=weight)])
    got = unet_out(merged)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    assert (got - unet_out(unet)).abs().max() > MARGIN  # the LoRA really did something
    assert report.loras[0].unet_modules == len(pieces)
    return report


def report_formats(report) -> tuple[str, ...]:
    return report.loras[0].formats


def test_kohya_lora_linear_and_1x1_with_per_module_alphas(unet, tmp_path):
    g = _gen(0)
    alphas = [1.0, 8.0, None, 0.5, 3.0, 16.0, 2.0, 4.0]
    pieces = {n: lora_piece(unet.get_submodule(n), g, rank=4, alpha=a) for n, a in
              zip(UNET_LINEAR + UNET_CONV1, alphas)}
    report = _check_unet(unet, pieces, tmp_path / "lora.safetensors")
    assert report.loras[0].formats == ("lora",)


def test_per_module_alpha_is_not_one_file_wide_alpha(unet, tmp_path):
    # Same factors written with a single alpha must give a different model: each module's own alpha counts.
    g = _gen(1)
    names = UNET_LINEAR[:3]
    pieces = {n: lora_piece(unet.get_submodule(n), g, rank=4, alpha=a) for n, a in zip(names, [1.0, 4.0, 16.0])}
    _check_unet(unet, pieces, tmp_path / "a.safetensors")
    uniform = {kohya_stem("lora_unet_", n): {**p.tensors, "alpha": torch.tensor(4.0)} for n, p in pieces.items()}
    merged = copy.deepcopy(unet)
    apply_loras(merged, None, [LoraSpec(write_lora(tmp_path / "b.safetensors", uniform))])
    with hooked(unet, [(n, p.delta, 1.0) for n, p in pieces.items()]):
        assert (unet_out(merged) - unet_out(unet)).abs().max() > MARGIN


def test_locon_3x3_and_tucker(unet, tmp_path):
    g = _gen(2)
    pieces = {n: lora_piece(unet.get_submodule(n), g, rank=3, alpha=2.0, tucker=i in (1, 2, 4))
              for i, n in enumerate(UNET_CONV3)}
    pieces[UNET_LINEAR[0]] = lora_piece(unet.get_submodule(UNET_LINEAR[0]), g, rank=2, alpha=1.0)
    assert report_formats(_check_unet(unet, pieces, tmp_path / "locon.safetensors")) == ("locon", "lora")


def test_loha_linear_conv_and_tucker(unet, tmp_path):
    g = _gen(3)
    names = UNET_LINEAR[:3] + UNET_CONV1[:1] + UNET_CONV3[:4]
    pieces = {n: loha_piece(unet.get_submodule(n), g, rank=3, alpha=[1.0, 6.0][i % 2], tucker=i >= 6)
              for i, n in enumerate(names)}
    assert report_formats(_check_unet(unet, pieces, tmp_path / "loha.safetensors")) == ("loha",)


def test_lokr_full_and_decomposed_factors(unet, tmp_path):
    g = _gen(4)
    m = unet.get_submodule
    pieces = {
        UNET_LINEAR[0]: lokr_piece(m(UNET_LINEAR[0]), g, om=4, im=8),  # both full: no alpha scaling
        UNET_LINEAR[1]: lokr_piece(m(UNET_LINEAR[1]), g, om=8, im=4, w2_rank=2, alpha=4.0),
        UNET_LINEAR[2]: lokr_piece(m(UNET_LINEAR[2]), g, om=4, im=2, w1_rank=2, w2_rank=3, alpha=1.5),
        UNET_LINEAR[4]: lokr_piece(m(UNET_LINEAR[4]), g, om=2, im=8, w1_rank=1, alpha=3.0),
        UNET_CONV3[1]: lokr_piece(m(UNET_CONV3[1]), g, om=4, im=4),
        UNET_CONV3[2]: lokr_piece(m(UNET_CONV3[2]), g, om=2, im=4, w2_rank=3, alpha=2.0),
        UNET_CONV3[3]: lokr_piece(m(UNET_CONV3[3]), g, om=4, im=2, w2_rank=2, tucker=True, alpha=5.0),
        UNET_CONV1[1]: lokr_piece(m(UNET_CONV1[1]), g, om=2, im=4),
    }
    assert report_formats(_check_unet(unet, pieces, tmp_path / "lokr.safetensors")) == ("lokr",)


def test_lokr_full_factors_ignore_alpha(unet, tmp_path):
    g = _gen(5)
    p = lokr_piece(unet.get_submodule(UNET_LINEAR[0]), g, om=4, im=8)
    p.tensors["alpha"] = torch.tensor(123.0)  # LyCORIS writes it, but there is no rank to divide by
    _check_unet(unet, {UNET_LINEAR[0]: p}, tmp_path / "lokr.safetensors")


def test_original_ldm_layout_names(unet, tmp_path):
    ldm = {
        "input_blocks.0.0": "conv_in", "input_blocks.2.0.emb_layers.1": "down_blocks.0.resnets.1.time_emb_proj",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.1.proj_in": "down_blocks.1.attentions.0.proj_in",
        "input_blocks.5.1.transformer_blocks.0.attn2.to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
        "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
        "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.3.0.skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
        "out.2": "conv_out", "time_embed.0": "time_embedding.linear_1",
    }
    g = _gen(6)
    pieces = {d: lora_piece(unet.get_submodule(d), g, rank=2, alpha=1.0) for d in ldm.values()}
    back = {diffusers: old for old, diffusers in ldm.items()}
    _check_unet(unet, pieces, tmp_path / "ldm.safetensors", stem=lambda n: kohya_stem("lora_unet_", back[n]))


@pytest.mark.parametrize("layout", ["peft", "base_model", "legacy"])
def test_diffusers_and_peft_names(unet, te, tmp_path, layout):
    g = _gen(7)
    names = UNET_LINEAR[:4] + UNET_CONV3[:1]
    pieces = {n: lora_piece(unet.get_submodule(n), g, rank=4, alpha=None) for n in names}
    down, up = {"peft": ("lora_A", "lora_B"), "base_model": ("lora_A", "lora_B"),
                "legacy": ("lora.down", "lora.up")}[layout]
    entries = {("base_model.model." if layout == "base_model" else "unet.") + n: {
        f"{down}.weight": p.tensors["lora_down.weight"], f"{up}.weight": p.tensors["lora_up.weight"]}
        for n, p in pieces.items()}
    md = None
    if layout == "peft":  # diffusers keeps PEFT's alpha in the safetensors metadata
        md = {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"conv_in": 2}}'}
        pieces = {n: Piece(p.tensors, (lambda f, s: lambda x: s * f(x))(p.delta, 0.5 if n == "conv_in" else 2.0))
                  for n, p in pieces.items()}
    # one text-encoder module too: PEFT/diffusers spell it from the `text_model.` root
    tp = lora_piece(te.get_submodule(TE_PARTIAL[0]), g, rank=3)
    entries[("base_model.model." if layout == "base_model" else "text_encoder.") + "text_model." + TE_PARTIAL[0]] = {
        f"{down}.weight": tp.tensors["lora_down.weight"], f"{up}.weight": tp.tensors["lora_up.weight"]}
    with hooked(unet, [(n, p.delta, 0.7) for n, p in pieces.items()]), hooked(te, [(TE_PARTIAL[0], tp.delta, 0.7)]):
        want, want_te = unet_out(unet), te_out(te)
    merged, merged_te = copy.deepcopy(unet), copy.deepcopy(te)
    report = apply_loras(merged, merged_te, [LoraSpec(write_lora(tmp_path / "p.safetensors", entries, md), 0.7)])
    torch.testing.assert_close(unet_out(merged), want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(te_out(merged_te), want_te, atol=ATOL, rtol=1e-5)
    assert (report.loras[0].unet_modules, report.loras[0].text_encoder_modules) == (len(names), 1)


def test_diffusers_attention_processor_names(unet, tmp_path):
    g = _gen(8)
    base = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    pieces = {f"{base}.to_q": lora_piece(unet.get_submodule(f"{base}.to_q"), g),
              f"{base}.to_out.0": lora_piece(unet.get_submodule(f"{base}.to_out.0"), g)}
    entries = {f"unet.{base}.processor.{p}_lora": {"down.weight": pieces[n].tensors["lora_down.weight"],
                                                   "up.weight": pieces[n].tensors["lora_up.weight"]}
               for p, n in (("to_q", f"{base}.to_q"), ("to_out", f"{base}.to_out.0"))}
    with hooked(unet, [(n, p.delta, 1.0) for n, p in pieces.items()]):
        want = unet_out(unet)
    merged = copy.deepcopy(unet)
    apply_loras(merged, None, [LoraSpec(write_lora(tmp_path / "a.safetensors", entries))])
    torch.testing.assert_close(unet_out(merged), want, atol=ATOL, rtol=1e-5)

