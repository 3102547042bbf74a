"""The MIL reference executor on a full-size UNet (its chunks, chained) vs the PyTorch forward of the
source UNet on the same inputs: how much slower proving a package is than running the model."""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_executor(bundle: Path, checkpoint: Path, repeats: int = 3) -> dict:
    from mlsd.checkpoints.load import load_model
    from mlsd.coreml import Executor

    manifest = json.loads((bundle / "mlsd.json").read_text())
    t0 = time.perf_counter()
    parts = [Executor(bundle / name) for name in manifest["components"]["unet"]["files"]]
    load_s = time.perf_counter() - t0
    shape = parts[0].inputs["sample"].shape
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(*shape, generator=g)
    ctx = torch.randn(shape[0], 77, 768, generator=g)
    t = torch.tensor([601.0] * shape[0])
    feed0 = {"sample": sample.numpy().astype(np.float16), "timestep": t.numpy().astype(np.float16),
             "encoder_hidden_states": ctx.permute(0, 2, 1).unsqueeze(2).numpy().astype(np.float16)}
    result = {}

    def chained():
        values = dict(feed0)
        for part in parts:
            values.update(part.run({n: values[n].astype(np.float16 if s.dtype == "fp16" else np.float32)
                                    for n, s in part.inputs.items()}))
        result["ours"] = values["noise_pred"]

    executor_s = _median_time(chained, repeats)
    parts.clear()  # the executor's fp32 weights (3.4 GB) go before the torch UNet loads
    gc.collect()
    unet = load_model(checkpoint, dtype=torch.float32).unet

    def forward():
        with torch.inference_mode():
            result["torch"] = unet(sample, t, encoder_hidden_states=ctx).sample.numpy()

    torch_s = _median_time(forward, repeats)
    err = result["ours"].astype(np.float64) - result["torch"]
    peak = float(result["torch"].max() - result["torch"].min())
    return {"latent": list(shape), "executor_s": executor_s, "torch_s": torch_s, "ratio": executor_s / torch_s,
            "load_s": load_s, "psnr": 20 * np.log10(peak / np.sqrt((err**2).mean())),
            "max_abs": float(np.abs(err).max())}
