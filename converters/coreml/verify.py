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


def palettized_twin(unet, packages, attention: str) -> torch.nn.Module:
    """The ANE UNet built from ``unet`` with every weight the packages palettized replaced by its
    dequantized value: what the packages compute, in PyTorch.

    mlsd's packages name a weight after its parameter (torch.export's ``p_<path>``, plus the fp16
    pass's ``_to_fp16``); packages converted elsewhere use other names, so what the names leave
    unmatched goes to the unclaimed parameter of the same size whose values it is nearest to (k-means
    moves a weight far less than the distance between two different weights). Raises when a
    palettized weight fits no parameter, since a twin that kept source weights would pass vacuously.
    """
    from converters.coreml.ane.unet import AneUNet
    from mlsd.coreml.weights import constexpr_weights

    twin = AneUNet.from_diffusers(unet, attention=attention).float().eval()
    dense: dict[str, torch.Tensor] = {}
    for package in packages:
        dense |= constexpr_weights(package.program)
    adopt_weights(twin, dense)
    return twin


def adopt_weights(twin: torch.nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Copy each of ``dense`` into the parameter it belongs to (see `palettized_twin`)."""
    params = dict(twin.named_parameters())
    # fp32 export graphs name a weight's const "<param>_to_fp16", fp16 ones (mlsd's UNet) just "<param>".
    by_name = {f"p_{name.replace('.', '_')}{cast}_palettized": name for name in params for cast in ("_to_fp16", "")}
    claimed: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in dense.items():
        if by_name.get(key) in params:
            claimed[by_name[key]] = value
        else:
            unmatched.append((key, value))
    for key, value in sorted(unmatched, key=lambda kv: -kv[1].numel()):
        candidates = [n for n, p in params.items() if n not in claimed and p.numel() == value.numel()]
        errors = {n: float((params[n].detach().reshape(-1) - value.reshape(-1).float()).pow(2).mean())
                  for n in candidates}
        best = min(errors, key=errors.get) if errors else None
        scale = float(value.float().pow(2).mean()) or 1.0
        if best is None or errors[best] > 0.25 * scale:
            raise RuntimeError(f"the palettized weight {key} {tuple(value.shape)} fits no UNet parameter")
        claimed[best] = value
    if not claimed:
        raise RuntimeError("the packages hold no palettized UNet weight")
    with torch.no_grad():
        for name, value in claimed.items():
            params[name].copy_(value.reshape(params[name].shape).float())


def _functions(component: dict) -> list[str | None]:
    """The functions to check: each size of a multi-size package, else the package's only one."""
    functions = component.get("functions") or ["main"]
    return [None] if functions == ["main"] else list(functions)


def _label(output: str, function: str | None) -> str:
    return output if function is None else f"{output}@{function}"


def verify_bundle(bundle: str | Path, against: str | Path | None = None, *, write: bool = True) -> list[Check]:
    from converters.coreml.components import TextEncoderWrapper

    bundle = Path(bundle)
    manifest = json.loads((bundle / "mlsd.json").read_text(encoding="utf-8"))
    model = source_model(manifest, Path(against) if against else None)
    components = manifest["components"]
    g = torch.Generator().manual_seed(0)
    checks: list[Check] = []
    ids = model.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        wrapper = TextEncoderWrapper(model.text_encoder, clip_skip=int(manifest.get("clip_skip", 1)))
        hidden, pooled = wrapper(ids)
        if "text_encoder" in components:
            checks += _text_encoder(bundle, ids, hidden, pooled)
        if "unet" in components:
            quantized = bool(manifest["options"].get("quantize_bits"))
            for function in _functions(components["unet"]):
                checks += _unet(bundle, components["unet"], function, model, hidden.flip(0), quantized, g)
        for kind in ("vae_decoder", "vae_encoder"):
            if kind in components:
                for function in _functions(components[kind]):
                    checks += _VAE_CHECKS[kind](bundle, function, model, g)
    if write:
        manifest["verification"] = {
            "executor": "mlsd MIL reference executor (fp16 rounding at op boundaries)", "gate_db": GATE_DB,
            "results": [c.__dict__ | {"passed": c.passed} for c in checks]}
        tmp = bundle / "mlsd.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, bundle / "mlsd.json")
    return checks


def _text_encoder(bundle: Path, ids, hidden, pooled) -> list[Check]:
    from mlsd.coreml import Executor

    te = Executor(bundle / "TextEncoder.mlpackage")
    outs = [te.run({"input_ids": ids[i:i + 1].float().numpy()}) for i in range(2)]
    return [_check("text_encoder", "last_hidden_state",
                   np.concatenate([o["last_hidden_state"] for o in outs]), hidden.numpy()),
            _check("text_encoder", "pooled_outputs", np.concatenate([o["pooled_outputs"] for o in outs]),
                   pooled.numpy())]


def _unet(bundle: Path, component: dict, function, model, ctx, quantized: bool, g) -> list[Check]:
    """The chained chunks against the source UNet; ``ctx`` is [uncond; cond], as the pipeline calls it."""
    from mlsd.coreml import Executor

    parts = [Executor(bundle / name, function) for name in component["files"]]
    tokens = parts[0].inputs["encoder_hidden_states"].shape[-1]
    if tokens != ctx.shape[1]:  # a long-prompt function: chunks that differ, as real 75-token chunks do
        ctx = torch.cat([ctx.roll(i, dims=0) for i in range(tokens // ctx.shape[1])], dim=1)
    sample = torch.randn(*parts[0].inputs["sample"].shape, generator=g)
    t = torch.tensor([601.0, 601.0])
    values = {"sample": sample.numpy(), "timestep": t.numpy(),
              "encoder_hidden_states": ctx.permute(0, 2, 1).unsqueeze(2).contiguous().numpy()}
    for part in parts:
        values.update(part.run({n: values[n].astype(np.float16 if s.dtype == "fp16" else np.float32)
                                for n, s in part.inputs.items()}))
    ours = values["noise_pred"]
    ref = model.unet(sample, t, encoder_hidden_states=ctx).sample.numpy()
    if not quantized:
        return [_check("unet", _label("noise_pred", function), ours, ref)]
    # Gate against the source with the package's own palettized weights; the k-means loss against
    # full precision is reported beside it, ungated (it is a choice, not a fault).
    twin = palettized_twin(model.unet, parts, component.get("attention", "split_einsum"))
    same = twin(sample, t, ctx.permute(0, 2, 1).unsqueeze(2)).numpy()
    return [_check("unet", _label("noise_pred", function), ours, same),
            _check("unet", _label("noise_pred vs full precision", function), ours, ref, gated=False)]


def _vae_decoder(bundle: Path, function, model, g) -> list[Check]:
    from mlsd.coreml import Executor

    dec = Executor(bundle / "VAEDecoder.mlpackage", function)
    z = torch.randn(*dec.inputs["z"].shape, generator=g) / model.vae.config.scaling_factor
    return [_check("vae_decoder", _label("image", function), dec.run({"z": z.numpy()})["image"],
                   model.vae.decode(z).sample.numpy())]


def _vae_encoder(bundle: Path, function, model, g) -> list[Check]:
    from converters.coreml.components import VAEEncoderWrapper
    from mlsd.coreml import Executor

    enc = Executor(bundle / "VAEEncoder.mlpackage", function)
    _, _, h, w = enc.inputs["x"].shape
    x = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    return [_check("vae_encoder", _label("latent", function), enc.run({"x": x.numpy()})["latent"],
                   VAEEncoderWrapper(model.vae)(x).numpy())]


_VAE_CHECKS = {"vae_decoder": _vae_decoder, "vae_encoder": _vae_encoder}
