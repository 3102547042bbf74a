"""The UNet stage: ANE-friendly module -> mlprogram -> (palettize) -> N chunks, one or several sizes."""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from converters.coreml.bundle import unet_package_names

BATCH = 2  # classifier-free guidance: uncond and cond together, as Apple's pipelines call it
TOKENS = 77


def unet_example_inputs(unet_config, latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    h, w = latent_hw
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(BATCH, unet_config.in_channels, h, w, generator=g),
        "timestep": torch.tensor([999.0] * BATCH),
        "encoder_hidden_states": torch.randn(BATCH, unet_config.cross_attention_dim, 1, TOKENS, generator=g),
    }


def convert_unet_size(ane_unet, unet_config, latent_hw, *, minimum_target, bits, chunks):
    """One size: the mlprogram(s) for its chunks, and the chunk plan."""
    from converters.coreml.chunk import split_mlmodel
    from converters.coreml.export import to_mlprogram

    # Apple's contract: fp16 inputs, fp32 noise_pred (the Swift pipeline reads fp32 outputs).
    mlmodel = to_mlprogram(
        ane_unet, unet_example_inputs(unet_config, latent_hw),
        input_dtypes={"sample": np.float16, "timestep": np.float16, "encoder_hidden_states": np.float16},
        output_names=["noise_pred"], output_dtypes={"noise_pred": np.float32}, minimum_target=minimum_target)
    stats = {}
    if bits:
        from dataclasses import asdict

        from converters.coreml.quantize import palettize, palettize_stats

        # Before chunking, so every chunk is compressed and the balancer sees the palettized bytes.
        mlmodel = palettize(mlmodel, bits)
        stats = asdict(palettize_stats(mlmodel)) | {"ratio": palettize_stats(mlmodel).ratio}
    parts, plan = split_mlmodel(mlmodel, chunks)
    return parts, plan, stats


def convert_unet(model, options, writer):
    from converters.coreml.ane.unet import AneUNet
    from converters.coreml.convert import _target
    from converters.coreml.export import save_package

    config = model.unet.config
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    ane = AneUNet.from_diffusers(model.unet, attention=options.attention).float().eval()
    names = unet_package_names(options.chunks)
    target = _target(options.min_target)
    per_size = []
    with tempfile.TemporaryDirectory(dir=writer.work) as scratch:
        for w, h in options.sizes:
            parts, plan, stats = convert_unet_size(ane, config, (h // factor, w // factor), minimum_target=target,
                                                   bits=options.quantize_bits, chunks=options.chunks)
            if len(options.sizes) == 1:
                for part, name in zip(parts, names, strict=True):
                    save_package(part, writer.path(name))
            else:
                for part, name in zip(parts, names, strict=True):
                    save_package(part, Path(scratch) / f"{w}x{h}" / name)
            per_size.append({"size": f"{w}x{h}", "chunks": _plan_json(plan), "quantization": stats})
            del parts
            gc.collect()
        if len(options.sizes) > 1:
            _merge_sizes(Path(scratch), options.sizes, names, writer)
    del ane
    gc.collect()
    functions = [f"{w}x{h}" for w, h in options.sizes] if len(options.sizes) > 1 else ["main"]
    return names, {"sizes": per_size, "functions": functions, "attention": options.attention,
                   "bytes": {n: _dir_bytes(writer.path(n)) for n in names}}


def _merge_sizes(scratch: Path, sizes, names, writer) -> None:
    """One multifunction package per chunk; functions named WxH share identical weights on disk."""
    import coremltools as ct

    for name in names:
        desc = ct.utils.MultiFunctionDescriptor()
        for w, h in sizes:
            desc.add_function(str(scratch / f"{w}x{h}" / name), src_function_name="main",
                              target_function_name=f"{w}x{h}")
        desc.default_function_name = f"{sizes[0][0]}x{sizes[0][1]}"
        tmp = writer.path(f".{name}.tmp")
        ct.utils.save_multifunction(desc, str(tmp))
        shutil.move(str(tmp), writer.path(name))


def _plan_json(plan) -> dict:
    import json

    return json.loads(plan.to_json())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
