"""PyTorch on CUDA, MPS or CPU: the fallback everywhere, and the reference for every other backend."""

from __future__ import annotations

import logging

import torch

from mlsd.backends.base import ModelTraits
from mlsd.checkpoints.load import LoadedModel
from mlsd.devices import pick_device
from mlsd.errors import UsageError

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_precision(device: str) -> str:
    # fp16 is the norm on GPUs; CPU fp16 kernels are slow and lossy, so CPU stays fp32 unless asked (bf16).
    return "fp16" if device in ("cuda", "mps") else "fp32"


def has_cpp_compiler() -> bool:
    """Inductor writes and builds C++ for CPU kernels."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def compile_forward(module: torch.nn.Module, device: str) -> None:
    """torch.compile `module`'s forward (inductor). On CPU the weights are frozen into the graph, which
    lets inductor prepack every conv/linear weight for oneDNN/MKL once instead of on every call: the
    UNet's fp32 step time on the 2-core CPU of docs/benchmarks.md drops ~1.4x. The first call compiles
    (about a minute there; cached on disk by inductor for later runs), and changing the weights
    afterwards is not seen, which is why LoRAs are merged before. Only `forward` is compiled, so the
    module's hooks and attributes stay as they were."""
    try:
        import torch._inductor  # noqa: F401  (absent from some minimal builds)
    except ImportError as e:
        raise UsageError("This PyTorch build has no torch.compile (inductor).", fix="drop --compile") from e
    if device == "cpu" and not has_cpp_compiler():
        raise UsageError("--compile on the CPU needs a C++ compiler, and none is on PATH (g++, c++, clang++).",
                         fix="install one (Debian: build-essential; macOS: xcode-select --install), or drop --compile")
    import torch._inductor.config as inductor

    compiled = torch.compile(module.forward)
    freeze = device == "cpu"

    # Inductor compiles at the first call and reads `freezing` then (compile(options=...) does not
    # reach it: measured, no speed-up), so every call runs under the setting, and nothing else in the
    # process sees it.
    def forward(*args, **kwargs):
        with inductor.patch(freezing=freeze):
            return compiled(*args, **kwargs)

    module.forward = forward


class TorchBackend:
    name = "torch"

    def __init__(self, model: LoadedModel, device: str = "auto", precision: str | None = None,
                 compile_unet: bool = False):
        self.device, self.device_reason = pick_device(device)
        precision = precision or default_precision(self.device)
        if precision not in PRECISIONS:
            raise UsageError(f"Unknown precision '{precision}'.", fix=f"use one of: {', '.join(PRECISIONS)}")
        if precision == "fp16" and self.device == "cpu":
            log.warning("fp16 on CPU is slow; bf16 is the fast CPU half precision")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.model = model
        self.tokenizer = model.tokenizer
        for module in (model.unet, model.vae, model.text_encoder):
            module.to(device=self.device, dtype=self.dtype)
        if self.device == "mps":
            model.unet.set_attention_slice("auto")  # unified memory is shared with the OS: keep peaks low
        if compile_unet:
            compile_forward(model.unet, self.device)
        vae = model.vae.config
        self.traits = ModelTraits(
            family=model.family.name,
            prediction_type=model.prediction_type,
            scheduler_config=model.scheduler_config,
            latent_channels=vae.latent_channels,
            unet_in_channels=model.unet.config.in_channels,
            vae_scale_factor=2 ** (len(vae.block_out_channels) - 1),
            scaling_factor=vae.scaling_factor,
        )

    @torch.inference_mode()
    def encode_tokens(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        te = self.model.text_encoder
        out = te(ids.to(self.device), output_hidden_states=clip_skip > 1)
        if clip_skip <= 1:
            hidden = out.last_hidden_state
        else:
            # A1111's "clip skip N": the output of the N-th layer from the end, through the final layer norm.
            layers = len(out.hidden_states) - 1
            hidden = out.hidden_states[-min(clip_skip, layers)]
            final_norm = te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm
            hidden = final_norm(hidden)
        return hidden.float()

    @torch.inference_mode()
    def predict_noise(self, latents, timestep, context):
        out = self.model.unet(latents.to(self.device, self.dtype), timestep,
                              encoder_hidden_states=context.to(self.device, self.dtype), return_dict=False)[0]
        return out.float()

    @torch.inference_mode()
    def decode(self, latents):
        vae = self.model.vae
        z = (latents / self.traits.scaling_factor).to(self.device, self.dtype)
        image = vae.decode(z, return_dict=False)[0]
        if self.dtype == torch.float16 and not torch.isfinite(image).all():
            # fp16 VAEs overflow on some latents and draw black/NaN images: redo this one in fp32.
            log.warning("fp16 VAE produced NaN/inf; decoding again in fp32")
            vae.to(torch.float32)
            try:
                image = vae.decode(z.float(), return_dict=False)[0]
            finally:
                vae.to(self.dtype)
        return image.float()

    @torch.inference_mode()
    def encode_image(self, images):
        vae = self.model.vae
        h = vae.encoder(images.to(self.device, self.dtype))
        if vae.quant_conv is not None:
            h = vae.quant_conv(h)
        return h.float()
