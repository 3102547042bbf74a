"""Text encoders, LoRA weights (0, negative, te vs unet), stacking LoRAs, dtypes and the report."""

from __future__ import annotations

import copy

import pytest
import torch

from mlsd.lora import LoraSpec, apply_loras
from tests.lora_fixtures import (
    TE_PARTIAL,
    UNET_CONV3,
    UNET_LINEAR,
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

ATOL, MARGIN = 1e-5, 1e-2


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def te():
    return tiny_text_encoder()


@pytest.fixture(scope="module")
def lora_files(unet, te, tmp_path_factory):
    """Two mixed-format LoRAs overlapping on some modules, each with UNet and partial text-encoder parts."""
    d, files = tmp_path_factory.mktemp("loras"), []
    for seed in (10, 11):
        g = torch.Generator().manual_seed(seed)
        u = {n: lora_piece(unet.get_submodule(n), g, alpha=2.0 + seed) for n in UNET_LINEAR[seed - 10:][:4]}
        u[UNET_CONV3[1]] = loha_piece(unet.get_submodule(UNET_CONV3[1]), g, alpha=1.0)
        t = {n: lora_piece(te.get_submodule(n), g, rank=3, alpha=1.5) for n in TE_PARTIAL[:2]}
        t[TE_PARTIAL[3]] = lokr_piece(te.get_submodule(TE_PARTIAL[3]), g, om=4, im=1, w2_rank=2, alpha=1.0)
        entries = {kohya_stem("lora_unet_", n): p for n, p in u.items()}
        # kohya spells text-encoder modules from the pre-transformers-5 `text_model.` root
        entries |= {kohya_stem("lora_te_text_model_", n): p for n, p in t.items()}
        files.append((write_lora(d / f"l{seed}.safetensors", entries), u, t))
    return files


def _merged(unet, te, specs):
    mu, mt = copy.deepcopy(unet), copy.deepcopy(te)
    return mu, mt, apply_loras(mu, mt, specs)


def test_weight_zero_is_bit_identical(unet, te, lora_files):
    mu, mt, report = _merged(unet, te, [LoraSpec(lora_files[0][0], unet_weight=0.0)])
    for base, merged in ((unet, mu), (te, mt)):
        for (name, a), b in zip(base.state_dict().items(), merged.state_dict().values()):
            assert torch.equal(a, b), name
    assert report.loras[0].unet_modules == 5 and report.loras[0].text_encoder_modules == 3


def test_partial_text_encoder_lora_matches_hooks_and_changes_only_its_layers(unet, te, lora_files):
    path, _, t = lora_files[0]
    mu, mt, _ = _merged(unet, te, [LoraSpec(path, unet_weight=0.0, te_weight=1.0)])
    with hooked(te, [(n, p.delta, 1.0) for n, p in t.items()]):
        want = te_out(te)
    got = te_out(mt)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    assert (got - te_out(te)).abs().max() > MARGIN
    changed = {n for n, p in mt.named_parameters() if not torch.equal(p, te.get_parameter(n))}
    assert changed == {f"{n}.weight" for n in t}  # layers 1 and 3 only; biases untouched
    base_h, merged_h = te_out(te, hidden=True), te_out(mt, hidden=True)
    assert torch.equal(base_h[1], merged_h[1])  # layer 0 is not in the LoRA
    assert (base_h[2] - merged_h[2]).abs().max() > MARGIN  # layer 1 is


def test_two_loras_with_own_weights_sum(unet, te, lora_files):
    (p1, u1, t1), (p2, u2, t2) = lora_files
    specs = [LoraSpec(p1, unet_weight=0.8, te_weight=-0.5), LoraSpec(p2, unet_weight=-1.3)]
    mu, mt, report = _merged(unet, te, specs)
    hooks_u = [(n, p.delta, 0.8) for n, p in u1.items()] + [(n, p.delta, -1.3) for n, p in u2.items()]
    hooks_t = [(n, p.delta, -0.5) for n, p in t1.items()] + [(n, p.delta, -1.3) for n, p in t2.items()]
    with hooked(unet, hooks_u), hooked(te, hooks_t):
        want_u, want_t = unet_out(unet), te_out(te)
    torch.testing.assert_close(unet_out(mu), want_u, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(te_out(mt), want_t, atol=ATOL, rtol=1e-5)
    assert [r.te_weight for r in report.loras] == [-0.5, -1.3]  # None means "same as unet"


def test_te_weight_zero_without_text_encoder_skips_it(unet, lora_files):
    mu = copy.deepcopy(unet)
    report = apply_loras(mu, None, [LoraSpec(lora_files[0][0], unet_weight=1.0, te_weight=0.0)])
    r = report.loras[0]
    assert (r.unet_modules, r.text_encoder_modules, r.skipped_text_encoder_modules) == (5, 0, 3)
    assert "skipped 3 text-encoder modules" in report.describe()


def test_half_precision_model_merges_in_float32_and_casts_once(unet, te, lora_files):
    specs = [LoraSpec(lora_files[0][0], 0.5), LoraSpec(lora_files[1][0], 0.5)]
    zu, zt = copy.deepcopy(unet), copy.deepcopy(te)
    for p in [*zu.parameters(), *zt.parameters()]:
        p.data.zero_()
    apply_loras(zu, zt, specs)  # a zero model ends up holding exactly the float32 sum of the deltas
    hu, ht = (copy.deepcopy(m).to(torch.bfloat16) for m in (unet, te))
    base = {id(p): p.clone() for p in [*hu.parameters(), *ht.parameters()]}
    apply_loras(hu, ht, specs)
    for half, deltas in ((hu, zu), (ht, zt)):
        for n, p in half.named_parameters():
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, (base[id(p)].float() + deltas.get_parameter(n)).to(torch.bfloat16)), n


def test_sdxl_lora_on_sdxl_models(tmp_path):
    unet, te1, te2 = tiny_unet(), tiny_text_encoder(seed=1), tiny_text_encoder(seed=2, with_projection=True)
    g = torch.Generator().manual_seed(12)
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    p1, p2 = lora_piece(te1.get_submodule(q[len("text_model."):]), g), lora_piece(te2.get_submodule(q), g)
    pu = lora_piece(unet.get_submodule(UNET_LINEAR[1]), g)
    path = write_lora(tmp_path / "xl.safetensors", {kohya_stem("lora_te1_", q): p1, kohya_stem("lora_te2_", q): p2,
                                                     kohya_stem("lora_unet_", UNET_LINEAR[1]): pu})
    m1, m2 = copy.deepcopy(te1), copy.deepcopy(te2)
    report = apply_loras(copy.deepcopy(unet), m1, [LoraSpec(path)], text_encoder_2=m2)
    assert (report.loras[0].unet_modules, report.loras[0].text_encoder_modules) == (1, 2)
    with hooked(te1, [(q[len("text_model."):], p1.delta, 1.0)]), hooked(te2, [(q, p2.delta, 1.0)]):
        torch.testing.assert_close(te_out(m1), te_out(te1), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(te_out(m2), te_out(te2), atol=ATOL, rtol=1e-5)


def test_a1111_weight_order_is_text_encoder_first():
    one, two = LoraSpec.from_a1111("x", 0.8), LoraSpec.from_a1111("x", 0.5, 1.2)
    assert (one.unet_weight, one.text_encoder_weight) == (0.8, 0.8)
    assert (two.unet_weight, two.text_encoder_weight) == (1.2, 0.5)
