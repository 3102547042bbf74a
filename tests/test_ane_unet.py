"""converters.coreml.ane.AneUNet equals diffusers' UNet2DConditionModel, exports, and converts to Core ML."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.overrides import TorchFunctionMode

from converters.coreml.ane import AneUNet, AttentionImpl, convert_diffusers_state_dict, map_diffusers_key
from converters.coreml.ane.layers import ChannelLayerNorm

MODES = [m.value for m in AttentionImpl]
TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
)
CONFIGS = {
    # SD1: conv proj_in/proj_out, `attention_head_dim=8` meaning 8 heads in every block.
    "sd1": dict(TINY, attention_head_dim=8),
    # SD2: linear proj_in/proj_out, per-block head counts, fp32-irrelevant upcast flag.
    "sd2": dict(TINY, attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=48,
                upcast_attention=True),
    # Inpainting input; 3 heads on 32 channels makes inner_dim (30) differ from the block width,
    # and two transformer layers per block exercise the layer stack.
    "inpaint": dict(TINY, in_channels=9, attention_head_dim=(3, 4), layers_per_block=1,
                    transformer_layers_per_block=2),
}
# Smaller still, for the slow paths (export, Core ML conversion).
EXPORT_CONFIG = dict(TINY, layers_per_block=1, attention_head_dim=2)
V2_CHUNK = 24  # 64 query tokens at 8x8 -> chunks of 24, 24, 16: exercises a ragged last chunk

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """diffusers zero-inits some convs/projections; randomise everything so every weight is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                is_scale = name.endswith("weight") and "norm" in name
                p.copy_((1.0 if is_scale else 0.0) + 0.2 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)


def _diffusers_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    _randomise(unet, seed)
    return unet


def _inputs(unet: UNet2DConditionModel, hw: tuple[int, int] = (8, 8), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(2, cfg.in_channels, *hw, generator=gen)
    timestep = torch.tensor([17.0, 803.0])
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen)
    return sample, timestep, context


def _ane_context(context: torch.Tensor) -> torch.Tensor:
    # (B, 77, C) -> Core ML contract (B, C, 1, 77). Contiguous, or torch.export records a permuted dim
    # order for the input that coremltools refuses ("non-contiguous dim order").
    return context.transpose(1, 2).unsqueeze(2).contiguous()


@pytest.fixture(scope="module")
def unets():
    return {name: _diffusers_unet(cfg) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(unets, name, mode):
    unet = unets[name]
    sample, timestep, context = _inputs(unet)
    ane = AneUNet.from_diffusers(unet, attention=mode, query_chunk_size=V2_CHUNK)
    with torch.no_grad():
        ref = unet(sample, timestep, context).sample
        out = ane(sample, timestep, _ane_context(context))
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape == (2, 4, 8, 8)
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"{name}/{mode}: max abs error {err:.3g} at output scale {scale:.3g}"


def test_equality_is_not_trivial(unets):
    unet = unets["sd1"]
    sample, timestep, context = _inputs(unet)
    ane = AneUNet.from_diffusers(unet)
    with torch.no_grad():
        ref = unet(sample, timestep, context).sample
        base = ane(sample, timestep, _ane_context(context))
        other_t = ane(sample, timestep + 1.0, _ane_context(context))
        # Not a token permutation: cross-attention is invariant to the order of keys.
        other_ctx = ane(sample, timestep, _ane_context(context.flip(2)))
    scale = ref.abs().max().item()
    assert (base - ref).abs().max() <= 1e-4 * max(1.0, scale)
    assert (other_t - ref).abs().max() > 1e-2 * scale, "timestep has no visible effect"
    assert (other_ctx - ref).abs().max() > 1e-2 * scale, "context has no visible effect"


def test_odd_latent_size_follows_diffusers_upsample_size(unets):
    unet = unets["sd1"]
    sample, timestep, context = _inputs(unet, hw=(9, 7))
    ane = AneUNet.from_diffusers(unet, attention="split_einsum_v2", query_chunk_size=V2_CHUNK)
    with torch.no_grad():
        ref = unet(sample, timestep, context).sample
        out = ane(sample, timestep, _ane_context(context))
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_key_mapping_covers_every_parameter_once(unets, name):
    unet = unets[name]
    source = unet.state_dict()
    mapped = convert_diffusers_state_dict(source)
    target = AneUNet(unet.config).state_dict()
    assert len(mapped) == len(source)
    assert set(mapped) == set(target), (set(mapped) ^ set(target))
    bad = {k: (tuple(mapped[k].shape), tuple(target[k].shape))
           for k in target if mapped[k].shape != target[k].shape}
    assert not bad


@pytest.mark.parametrize("overrides", [
    {},  # SD1.x (diffusers defaults are the SD1 UNet)
    {"in_channels": 9},  # SD1.x inpainting
    {"attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True, "cross_attention_dim": 1024,
     "upcast_attention": True},  # SD2.x
], ids=["sd1", "sd1-inpaint", "sd2"])
def test_full_size_configs_map_exactly(overrides):
    # Meta tensors: full SD shapes and key sets without allocating 860M parameters.
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, **overrides)
        target = AneUNet(unet.config).state_dict()
    mapped = convert_diffusers_state_dict(unet.state_dict())
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)


def test_map_diffusers_key_renames_and_reshapes():
    w = torch.randn(6, 5)
    [(key, out)] = map_diffusers_key("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight", w)
    assert key == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.weight"
    assert out.shape == (6, 5, 1, 1) and torch.equal(out[:, :, 0, 0], w)
    block = "down_blocks.0.attentions.1.transformer_blocks.0"
    assert map_diffusers_key(f"{block}.ff.net.0.proj.bias", torch.zeros(8))[0][0] == f"{block}.ff.geglu.bias"
    assert map_diffusers_key(f"{block}.ff.net.2.weight", torch.zeros(4, 16))[0][0] == f"{block}.ff.out.weight"
    conv = torch.randn(4, 4, 3, 3)
    [(key, out)] = map_diffusers_key("conv_in.weight", conv)
    assert key == "conv_in.weight" and out is conv
    with pytest.raises(KeyError):
        map_diffusers_key("add_embedding.linear_1.weight", torch.zeros(2, 2))


class _EinsumCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.Size, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.einsum:
            self.calls.append((args[0], tuple(a.shape for a in args[1:])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("mode", "chunk", "expected_chunks"),
                         [("split_einsum", 512, 1), ("split_einsum_v2", V2_CHUNK, 3),
                          ("split_einsum_v2", 512, 1)])
def test_split_modes_run_one_einsum_pair_per_head(unets, mode, chunk, expected_chunks):
    unet = unets["sd1"]  # 8 heads everywhere; attention at full resolution (64 tokens) and mid block (16)
    sample, timestep, context = _inputs(unet)
    ane = AneUNet.from_diffusers(unet, attention=mode, query_chunk_size=chunk)
    counter = _EinsumCalls()
    with torch.no_grad(), counter:
        ane(sample, timestep, _ane_context(context))
    full_res, mid = 2 + 3, 1  # transformers: down block 0 (2) + up block 1 (3); mid block (1)
    attentions_per_transformer, heads = 2, 8
    expected = 2 * heads * attentions_per_transformer * (full_res * expected_chunks + mid)
    assert len(counter.calls) == expected
    # Calls alternate: scores = q . k for one head and query block, then weights . v for the same.
    for (_, (q, k_t)), (_, (weights, v)) in zip(counter.calls[0::2], counter.calls[1::2]):
        # One head's channels only: 32 / 8 = 4 at full resolution, 64 / 8 = 8 in the mid block.
        assert q[1] == k_t[3] == v[1] and q[1] in (4, 8) and q[2] == 1
        assert q[3] == weights[3] <= min(chunk, 64) and weights[1] == k_t[1] == v[3]


def test_original_mode_runs_batched_einsums(unets):
    unet = unets["sd1"]
    sample, timestep, context = _inputs(unet)
    counter = _EinsumCalls()
    with torch.no_grad(), counter:
        AneUNet.from_diffusers(unet, attention="original")(sample, timestep, _ane_context(context))
    # Two einsums per attention, two attentions per transformer, six transformers.
    assert len(counter.calls) == 2 * 2 * 6


def test_channel_layer_norm_equals_layer_norm():
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(12)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.2)
        ref.bias.normal_(0.0, 0.2)
    ours = ChannelLayerNorm(12)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 12) * 3 + 1
    expected = ref(x)
    got = ours(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)


def test_rejects_unsupported_configs(unets):
    config = dict(unets["sd1"].config)
    with pytest.raises(NotImplementedError, match="addition_embed_type"):
        AneUNet(dict(config, addition_embed_type="text_time"))
    with pytest.raises(NotImplementedError, match="block types"):
        AneUNet(dict(config, down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D")))
    with pytest.raises(ValueError):
        AneUNet(config, attention="flash")
    AneUNet(dict(config, only_cross_attention=[False, False]))  # per-block "off" flags are fine
    with pytest.raises(NotImplementedError, match="only_cross_attention"):
        AneUNet(dict(config, only_cross_attention=[True, False]))


def test_half_precision_source_gives_fp32_model(unets):
    half = UNet2DConditionModel.from_config(unets["sd2"].config)
    half.load_state_dict(unets["sd2"].state_dict())
    half = half.half()
    ane = AneUNet.from_diffusers(half, attention="original")
    assert {p.dtype for p in ane.parameters()} == {torch.float32}
    assert ane.time_proj.freqs.dtype == torch.float32
    w = half.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    got = ane.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.equal(got[:, :, 0, 0], w.float())


@pytest.fixture(scope="module")
def exported():
    """torch.export programs of the small export model, built lazily and shared with the Core ML test."""
    unet = _diffusers_unet(EXPORT_CONFIG, seed=3)
    sample, timestep, context = _inputs(unet)
    args = (sample, timestep, _ane_context(context))
    cache: dict[str, tuple] = {}

    def get(mode: str):
        if mode not in cache:
            model = AneUNet.from_diffusers(unet, attention=mode, query_chunk_size=V2_CHUNK)
            program = torch.export.export(model, args).run_decompositions({})
            cache[mode] = (model, program)
        return (*cache[mode], args)

    return get


@pytest.mark.parametrize("mode", MODES)
def test_torch_export(exported, mode):
    model, program, args = exported(mode)
    with torch.no_grad():
        eager = model(*args)
        traced = program.module()(*args)
    assert torch.allclose(traced, eager, atol=1e-5)
    einsums = [n for n in program.graph.nodes if n.op == "call_function" and "einsum" in str(n.target)]
    # 4 transformers (down 0: 1, mid: 1, up 1: 2), 2 attentions each, 2 einsums per attention
    # (per head, and per query chunk at full resolution, when split).
    per_head = {"original": 1, "split_einsum": 2, "split_einsum_v2": 2 * 3}[mode]
    mid_per_head = {"original": 1, "split_einsum": 2, "split_einsum_v2": 2}[mode]
    assert len(einsums) == 2 * 2 * (3 * per_head + mid_per_head)


def test_coreml_conversion(exported, tmp_path):
    ct = pytest.importorskip("coremltools", reason="coremltools is not importable here")
    _, program, (sample, timestep, context) = exported("split_einsum")
    start = time.monotonic()
    mlmodel = ct.convert(
        program, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS14,
        compute_precision=ct.precision.FLOAT16,
        inputs=[ct.TensorType(name="sample", shape=sample.shape),
                ct.TensorType(name="timestep", shape=timestep.shape),
                ct.TensorType(name="encoder_hidden_states", shape=context.shape)],
        outputs=[ct.TensorType(name="noise_pred")],
    )
    mlmodel.save(str(tmp_path / "unet.mlpackage"))
    assert time.monotonic() - start < 120
    spec = mlmodel.get_spec()
    shapes = {f.name: tuple(f.type.multiArrayType.shape) for f in spec.description.input}
    assert shapes == {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 64, 1, 77)}
    assert [(f.name, tuple(f.type.multiArrayType.shape)) for f in spec.description.output] == [
        ("noise_pred", (2, 4, 8, 8))]
    assert (tmp_path / "unet.mlpackage").is_dir()
