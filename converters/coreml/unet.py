"""The UNet stage: ANE-friendly module -> mlprogram -> (palettize) -> N chunks, one or several sizes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from converters.coreml.bundle import unet_package_names

BATCH = 2  # classifier-free guidance: uncond and cond together, as Apple's pipelines call it
TOKENS = 77


def unet_example_inputs(unet_config, latent_hw: tuple[int, int], tokens: int = TOKENS) -> dict[str, torch.Tensor]:
    h, w = latent_hw
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(BATCH, unet_config.in_channels, h, w, generator=g),
        "timestep": torch.tensor([999.0] * BATCH),
        "encoder_hidden_states": torch.randn(BATCH, unet_config.cross_attention_dim, 1, tokens, generator=g),
    }


def convert_unet_size(make_ane, unet_config, latent_hw, *, minimum_target, bits, tokens: int = TOKENS):
    """One size as one mlprogram (palettized if asked). ``make_ane()`` builds the ANE module, which
    is freed before returning: it is the biggest thing in memory, and the saved package holds
    everything chunking needs."""
    from converters.coreml.export import release_memory, to_mlprogram

    ane = make_ane()
    dtype = next(ane.parameters()).dtype
    examples = {k: v.to(dtype) for k, v in unet_example_inputs(unet_config, latent_hw, tokens).items()}
    # Apple's contract: fp16 inputs, fp32 noise_pred (the Swift pipeline reads fp32 outputs).
    mlmodel = to_mlprogram(
        ane, examples,
        input_dtypes={"sample": np.float16, "timestep": np.float16, "encoder_hidden_states": np.float16},
        output_names=["noise_pred"], output_dtypes={"noise_pred": np.float32}, minimum_target=minimum_target)
    del ane
    release_memory()
    stats = {}
    if bits:
        from dataclasses import asdict

        from converters.coreml.quantize import palettize, palettize_stats

        # Before chunking, so every chunk is compressed and the balancer sees the palettized bytes.
        mlmodel = palettize(mlmodel, bits)
        stats = asdict(palettize_stats(mlmodel)) | {"ratio": palettize_stats(mlmodel).ratio}
    return mlmodel, stats


def convert_unet(model, options, writer):
    from converters.coreml.chunk import iter_chunks
    from converters.coreml.convert import _target
    from converters.coreml.export import release_memory, save_multifunction, save_package
    from mlsd.memory import drop_file_pages, tensor_ranges

    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    names = unet_package_names(options.chunks)
    config = model.unet.config
    # The stage owns the source UNet from here: it is dropped as soon as the last size's ANE module
    # holds a copy of its weights, so the source and the conversion never share the peak.
    source = {"unet": model.unet}
    model.unet = None
    functions = options.unet_functions()
    remaining = [len(functions)]

    def make_ane():
        from converters.coreml.ane.unet import AneUNet

        # fp16 from the start (the fp16 export route): the largest module in the converter never
        # exists in fp32, which is what keeps a full SD1.5 conversion's peak low.
        ane = AneUNet.from_diffusers(source["unet"], attention=options.attention, dtype=torch.float16)
        remaining[0] -= 1
        if not remaining[0]:
            pages = tensor_ranges(source["unet"].state_dict().values())
            source.clear()
            release_memory()
            drop_file_pages(pages)  # the checkpoint's UNet pages: the mapping outlives them (see mlsd.memory)
        return ane

    per_function = []
    with tempfile.TemporaryDirectory(dir=writer.work) as scratch:
        for function, (w, h), tokens in functions:
            mlmodel, stats = convert_unet_size(make_ane, config, (h // factor, w // factor),
                                               minimum_target=_target(options.min_target),
                                               bits=options.quantize_bits, tokens=tokens)
            plan, chunks = iter_chunks(mlmodel, options.chunks)
            folder = writer.work if function == "main" else Path(scratch) / function
            for part, name in zip(chunks, names, strict=True):
                save_package(part, folder / name)
                del part  # one chunk in memory at a time
            per_function.append({"function": function, "size": f"{w}x{h}", "tokens": tokens,
                                 "chunks": _plan_json(plan), "quantization": stats})
            del mlmodel
            release_memory()
        if functions[0][0] != "main":
            # Same weights in every function: coremltools stores them once per package.
            for name in names:
                save_multifunction({f: Path(scratch) / f / name for f, _, _ in functions}, writer.path(name))
    return names, {"sizes": per_function, "functions": [f for f, _, _ in functions], "attention": options.attention,
                   "bytes": {n: _dir_bytes(writer.path(n)) for n in names}}


def _plan_json(plan) -> dict:
    import json

    return json.loads(plan.to_json())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
