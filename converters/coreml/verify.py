"""`mlsd verify`: run each package of a bundle through the MIL reference executor and compare it with the
PyTorch source model rebuilt from the manifest (source file, LoRAs, VAE). Gate: PSNR >= 35 dB, Apple's figure."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GATE_DB = 35.0
PROMPT = "a photograph of an astronaut riding a horse, detailed, 8k"


@dataclass
class Check:
    component: str
    output: str
    psnr: float
    max_abs: float
    gated: bool = True

    @property
    def passed(self) -> bool:
        return not self.gated or self.psnr >= GATE_DB


def psnr(ours: np.ndarray, ref: np.ndarray) -> float:
    """PSNR against the reference's own peak-to-peak range (outputs here are not images in [0, 255])."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    mse = float(np.mean((ours - ref) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return 200.0 if mse == 0 else 20 * np.log10(peak / np.sqrt(mse))


def _check(component, output, ours, ref, gated=True) -> Check:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return Check(component, output, psnr(ours, ref), float(np.abs(ours - ref).max()), gated)


def source_model(manifest: dict, against: Path | None = None):
    """The PyTorch model the bundle was converted from, LoRAs and VAE merged the same way."""
    from mlsd.checkpoints.load import load_model
    from mlsd.lora import LoraSpec, apply_loras

    path = Path(against or manifest["source"]["path"])
    vae = Path(manifest["vae"]["path"]) if manifest.get("vae") else None
    model = load_model(path, prediction_type=manifest.get("prediction_type"), use_ema=bool(manifest.get("ema")),
                       vae=vae)
    loras = manifest.get("loras") or []
    if loras:
        apply_loras(model.unet, model.text_encoder,
                    [LoraSpec(Path(x["path"]), x["unet_weight"], x["te_weight"]) for x in loras])
    return model


def verify_bundle(bundle: str | Path, against: str | Path | None = None, *, write: bool = True) -> list[Check]:
    from converters.coreml.components import TextEncoderWrapper, VAEEncoderWrapper
    from mlsd.coreml import Executor

    bundle = Path(bundle)
    manifest = json.loads((bundle / "mlsd.json").read_text(encoding="utf-8"))
    model = source_model(manifest, Path(against) if against else None)
    components = manifest["components"]
    quantized = bool(manifest["options"].get("quantize_bits"))
    g = torch.Generator().manual_seed(0)
    checks: list[Check] = []
    ids = model.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        wrapper = TextEncoderWrapper(model.text_encoder, clip_skip=int(manifest.get("clip_skip", 1)))
        hidden, pooled = wrapper(ids)
        if "text_encoder" in components:
            te = Executor(bundle / "TextEncoder.mlpackage")
            outs = [te.run({"input_ids": ids[i:i + 1].float().numpy()}) for i in range(2)]
            checks.append(_check("text_encoder", "last_hidden_state",
                                 np.concatenate([o["last_hidden_state"] for o in outs]), hidden.numpy()))
            checks.append(_check("text_encoder", "pooled_outputs",
                                 np.concatenate([o["pooled_outputs"] for o in outs]), pooled.numpy()))
        if "unet" in components:
            parts = [Executor(bundle / name) for name in components["unet"]["files"]]
            shape = parts[0].inputs["sample"].shape
            sample = torch.randn(*shape, generator=g)
            t = torch.tensor([601.0, 601.0])
            ctx = hidden.flip(0)  # [uncond; cond], as the pipeline calls it
            values = {"sample": sample.numpy(), "timestep": t.numpy(),
                      "encoder_hidden_states": ctx.permute(0, 2, 1).unsqueeze(2).contiguous().numpy()}
            for part in parts:
                feed = {n: values[n].astype(np.float16 if s.dtype == "fp16" else np.float32)
                        for n, s in part.inputs.items()}
                values.update(part.run(feed))
            ref = model.unet(sample, t, encoder_hidden_states=ctx).sample
            # Palettized weights differ from the source by design: report the loss, don't gate it here.
            checks.append(_check("unet", "noise_pred", values["noise_pred"], ref.numpy(), gated=not quantized))
        if "vae_decoder" in components:
            dec = Executor(bundle / "VAEDecoder.mlpackage")
            z = torch.randn(*dec.inputs["z"].shape, generator=g) / model.vae.config.scaling_factor
            checks.append(_check("vae_decoder", "image", dec.run({"z": z.numpy()})["image"],
                                 model.vae.decode(z).sample.numpy()))
        if "vae_encoder" in components:
            enc = Executor(bundle / "VAEEncoder.mlpackage")
            _, _, h, w = enc.inputs["x"].shape
            x = torch.rand(1, 3, h, w, generator=g) * 2 - 1
            checks.append(_check("vae_encoder", "latent", enc.run({"x": x.numpy()})["latent"],
                                 VAEEncoderWrapper(model.vae)(x).numpy()))
    if write:
        manifest["verification"] = {
            "executor": "mlsd MIL reference executor (fp16 rounding at op boundaries)", "gate_db": GATE_DB,
            "results": [c.__dict__ | {"passed": c.passed} for c in checks]}
        tmp = bundle / "mlsd.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, bundle / "mlsd.json")
    return checks
