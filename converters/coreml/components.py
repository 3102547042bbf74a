"""Text encoder and VAE halves as Core ML programs with Apple's I/O contract.

Names and layouts are the ones Apple's ml-stable-diffusion Swift pipeline (and MochiDiffusion) load:
TextEncoder ``input_ids`` -> ``last_hidden_state``, ``pooled_outputs``; VAEDecoder ``z`` -> ``image``;
VAEEncoder ``x`` -> ``latent`` (moments). The wrappers share the source modules' weights, no copies.
"""

from __future__ import annotations

import coremltools as ct
import numpy as np
import torch
from torch import nn

from converters.coreml.export import model_spec, to_mlprogram

TEXT_LENGTH = 77
VAE_FACTOR = 8

_DTYPE_NAMES = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32", "DOUBLE": "float64"}


class TextEncoderWrapper(nn.Module):
    """CLIP text encoder with A1111's clip skip baked in; float ids in, like Apple's model.

    ``clip_skip=N`` reads the output of the N-th layer from the end (1 = last), then final_layer_norm,
    exactly as A1111 does. Only the layers that are used are kept, so skipped ones never reach Core ML.
    The pooled output is taken from the same (skipped, normed) states: a CLIPTextModel cut to that depth.
    """

    def __init__(self, text_encoder: nn.Module, clip_skip: int = 1):
        super().__init__()
        layers = text_encoder.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise ValueError(f"clip_skip must be in 1..{len(layers)}, got {clip_skip}")
        self.embeddings = text_encoder.embeddings
        self.layers = nn.ModuleList(list(layers)[: len(layers) - clip_skip + 1])
        self.final_layer_norm = text_encoder.final_layer_norm
        length = self.embeddings.position_embedding.num_embeddings
        # An explicit additive mask keeps the graph independent of transformers' mask helpers and of the
        # attention backend. -1e4 (Apple's choice) is finite in fp16, and exp(-1e4) is 0 in any precision.
        mask = torch.full((length, length), -1e4).triu(1)
        self.register_buffer("causal_mask", mask[None, None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Core ML's fp16 pass leaves `cast` alone, so ids reach int32 without an fp16 detour
        # (which could not hold ids above 2048 exactly).
        ids = input_ids.to(torch.int32)
        hidden = self.embeddings(input_ids=ids)
        mask = self.causal_mask.to(hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        hidden = self.final_layer_norm(hidden)
        # EOS (49407) is the largest id CLIP's tokenizers emit, so argmax finds its first occurrence.
        pooled = hidden[torch.arange(hidden.shape[0]), ids.argmax(dim=-1)]
        return hidden, pooled


class VAEDecoderWrapper(nn.Module):
    """Unscaled latent -> image in about [-1, 1]; same as ``vae.decode(z).sample`` (not clamped)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class VAEEncoderWrapper(nn.Module):
    """Image in [-1, 1] -> moments (mean, logvar) as one tensor; the caller samples and scales."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv if vae.quant_conv is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))


def convert_text_encoder(
    text_encoder: nn.Module,
    *,
    clip_skip: int = 1,
    minimum_target=ct.target.macOS14,
    precision: str = "fp16",
) -> ct.models.MLModel:
    """TextEncoder: ``input_ids`` (1, 77) float32 -> ``last_hidden_state`` (1, 77, C), ``pooled_outputs``
    (1, C); ``clip_skip`` in A1111's meaning (1 = last layer)."""
    wrapper = TextEncoderWrapper(text_encoder, clip_skip)
    length = wrapper.embeddings.position_embedding.num_embeddings
    if length != TEXT_LENGTH:
        raise ValueError(f"text encoder has {length} positions; Apple's pipeline feeds {TEXT_LENGTH}")
    # Any in-vocabulary ids: shapes are static, values do not shape the graph.
    ids = torch.zeros(1, TEXT_LENGTH, dtype=torch.float32)
    ids[0, 0], ids[0, 1] = 49406, 49407
    return _convert(wrapper, {"input_ids": ids}, ["last_hidden_state", "pooled_outputs"],
                    minimum_target, precision, input_dtypes={"input_ids": np.float32})


def convert_vae_decoder(
    vae: nn.Module,
    latent_size: tuple[int, int],
    *,
    minimum_target=ct.target.macOS14,
    precision: str = "fp16",
) -> ct.models.MLModel:
    """VAEDecoder: ``z`` (1, C, h, w) unscaled latent -> ``image`` (1, 3, 8h, 8w)."""
    h, w = latent_size
    z = torch.zeros(1, vae.config.latent_channels, h, w)
    return _convert(VAEDecoderWrapper(vae), {"z": z}, ["image"], minimum_target, precision)


def convert_vae_encoder(
    vae: nn.Module,
    image_size: tuple[int, int],
    *,
    minimum_target=ct.target.macOS14,
    precision: str = "fp16",
) -> ct.models.MLModel:
    """VAEEncoder: ``x`` (1, 3, H, W) in [-1, 1] -> ``latent`` (1, 2C, H/8, W/8) moments."""
    height, width = image_size
    if height % VAE_FACTOR or width % VAE_FACTOR:
        raise ValueError(f"image size must be a multiple of {VAE_FACTOR}, got {height}x{width}")
    x = torch.zeros(1, vae.config.in_channels, height, width)
    return _convert(VAEEncoderWrapper(vae), {"x": x}, ["latent"], minimum_target, precision)


def _convert(wrapper, example_inputs, output_names, minimum_target, precision, input_dtypes=None):
    # fp32 outputs (the math stays fp16): Apple's Swift pipeline reads them as MLShapedArray<Float32> and
    # traps on Float16 arrays (apple/coremltools#1947, MochiDiffusion#307). One cast per output.
    output_dtypes = dict.fromkeys(output_names, np.float32)
    not_fp32 = {p.dtype for p in wrapper.parameters()} - {torch.float32}
    if not_fp32:
        # Casting in place would change the caller's model; a copy would double peak memory.
        raise ValueError(f"export needs float32 weights, found {sorted(map(str, not_fp32))}: "
                         "load the checkpoint with dtype=torch.float32")
    return to_mlprogram(wrapper, example_inputs, input_dtypes=input_dtypes, output_names=output_names,
                        output_dtypes=output_dtypes, minimum_target=minimum_target, precision=precision)


def describe_io(mlmodel_or_path) -> dict:
    """``{"inputs": {name: {"shape": [...], "dtype": "float32"}}, "outputs": {...}}`` read from the spec."""
    spec = model_spec(mlmodel_or_path)

    def features(items) -> dict:
        out = {}
        for f in items:
            kind = f.type.WhichOneof("Type")
            if kind != "multiArrayType":
                out[f.name] = {"shape": None, "dtype": kind}
                continue
            arr = f.type.multiArrayType
            dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
            out[f.name] = {"shape": [int(d) for d in arr.shape],
                           "dtype": _DTYPE_NAMES.get(dtype, dtype.lower())}
        return out

    return {"inputs": features(spec.description.input), "outputs": features(spec.description.output)}
