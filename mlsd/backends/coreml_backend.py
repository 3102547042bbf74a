"""Core ML bundles as a backend: real Core ML on macOS, or the MIL reference executor anywhere.

Both runners sit behind one tiny interface (`predict(inputs) -> outputs`), so the
same code - chunk chaining, batch-2 UNet calls, dtype and shape checks - is what
runs on a Mac and what the tests exercise on Linux.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from mlsd.backends.base import ModelTraits
from mlsd.errors import InputFileError, UsageError

log = logging.getLogger(__name__)
COMPUTE_UNITS = ("auto", "ane", "gpu", "cpu", "all")


def is_bundle(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "mlsd.json").is_file()


def is_coreml_model(path: Path) -> bool:
    """An mlsd bundle, or Core ML models converted elsewhere (Apple's folders, HF repos, Resources folders)."""
    from mlsd.coreml.layouts import recognise

    return recognise(path) is not None


class _Reference:
    """The MIL reference executor (any OS)."""

    def __init__(self, path: Path, function: str | None):
        from mlsd.coreml import Executor

        self.executor = Executor(path, function)
        self.inputs = {n: (tuple(s.shape), s.dtype) for n, s in self.executor.inputs.items()}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.executor.run(inputs)


class _CoreML:
    """Core ML itself (macOS only); compiled once by Core ML and cached by the OS afterwards."""

    def __init__(self, path: Path, function: str | None, compute_unit: str):
        import coremltools as ct

        units = {"ane": ct.ComputeUnit.CPU_AND_NE, "gpu": ct.ComputeUnit.CPU_AND_GPU,
                 "cpu": ct.ComputeUnit.CPU_ONLY, "all": ct.ComputeUnit.ALL}[compute_unit]
        log.info("loading %s on %s (the first load compiles for the device and can take minutes)",
                 path.name, compute_unit)
        kwargs = {"function_name": function} if function else {}
        self.model = ct.models.MLModel(str(path), compute_units=units, **kwargs)
        spec = self.model.get_spec()
        self.inputs = {i.name: (tuple(i.type.multiArrayType.shape), _dtype(i.type.multiArrayType.dataType))
                       for i in spec.description.input}

    def predict(self, inputs):
        return self.model.predict(inputs)


def _dtype(code: int) -> str:
    return {65568: "fp32", 65552: "fp16", 131104: "int32"}.get(code, "fp32")


class _CompiledCoreML:
    """A compiled .mlmodelc (Apple's Swift pipeline, MochiDiffusion), loaded by Core ML as it is (macOS)."""

    def __init__(self, path: Path, compute_unit: str):
        import coremltools as ct

        from mlsd.coreml.package_info import read_package

        units = {"ane": ct.ComputeUnit.CPU_AND_NE, "gpu": ct.ComputeUnit.CPU_AND_GPU,
                 "cpu": ct.ComputeUnit.CPU_ONLY, "all": ct.ComputeUnit.ALL}[compute_unit]
        self.model = ct.models.CompiledMLModel(str(path), compute_units=units)
        self.inputs = read_package(path).inputs

    def predict(self, inputs):
        return self.model.predict(inputs)


class _ZeroResiduals:
    """A ControlNet-ready UNet part run without a ControlNet: its additional_residual_* inputs get zeros."""

    def __init__(self, part):
        self.part = part
        self.zeros = {n: np.zeros(shape, np.float16 if dtype == "fp16" else np.float32)
                      for n, (shape, dtype) in part.inputs.items() if n.startswith("additional_residual_")}
        self.inputs = {n: spec for n, spec in part.inputs.items() if n not in self.zeros}

    def predict(self, inputs):
        return self.part.predict({**inputs, **self.zeros})


class CoreMLBackend:
    def __init__(self, bundle: str | Path, *, runner: str = "reference", compute_unit: str = "auto",
                 size: tuple[int, int] | None = None, family: str | None = None,
                 prediction_type: str | None = None):
        """`bundle`: an mlsd bundle or a folder converted elsewhere (see mlsd.coreml.layouts); `family` and
        `prediction_type` fill in what such a folder cannot tell (an mlsd bundle records both)."""
        from mlsd.coreml.layouts import MLSD, read_layout
        from mlsd.families import FAMILIES, load_tokenizer

        self.bundle = Path(bundle)
        self.name = "coreml" if runner == "coreml" else "coreml-reference"
        self.device = "cpu"
        self.precision = "fp16"
        if runner == "coreml" and sys.platform != "darwin":
            raise UsageError("--backend coreml needs macOS (Core ML cannot run on this OS).", where="--backend",
                             fix="use --backend coreml-reference (slow, exact) or the source checkpoint")
        if compute_unit not in COMPUTE_UNITS:
            raise UsageError(f"Unknown compute unit '{compute_unit}'.", fix=f"use one of {', '.join(COMPUTE_UNITS)}")
        if family is not None and family not in FAMILIES:
            raise UsageError(f"Unknown family '{family}'.", where="--family", fix=f"use {', '.join(FAMILIES)}")
        # Only Core ML loads compiled .mlmodelc parts; the reference executor reads .mlpackage files.
        self.layout = read_layout(self.bundle, family=family, prediction_type=prediction_type,
                                  attention="original" if compute_unit == "gpu" else None,
                                  compiled_ok=runner == "coreml" and sys.platform == "darwin")
        for note in self.layout.notes:
            log.warning("%s: %s", self.bundle.name, note)
        self.manifest = self.layout.manifest
        if prediction_type and self.layout.kind == MLSD:
            self.manifest = self.manifest | {"prediction_type": prediction_type}
        attention = self.manifest.get("options", {}).get("attention", "split_einsum")
        if compute_unit == "auto":
            compute_unit = "gpu" if attention == "original" else "ane"
            log.info("compute unit %s (bundle attention: %s)", compute_unit, attention)
        self.compute_unit = compute_unit
        self.device_reason = f"{self.name}, compute unit {compute_unit}"
        family = FAMILIES[self.manifest["family"]]
        self.clip_skip = int(self.manifest.get("clip_skip", 1))
        self.tokenizer = load_tokenizer(family, self.layout.tokenizer)
        components = self.manifest.get("components", {})
        missing = [c for c in ("text_encoder", "unet", "vae_decoder") if c not in components]
        if missing:
            raise InputFileError(f"The bundle lacks {', '.join(missing)}.", where=self.bundle,
                                 fix="convert again with those --components")
        unet = components["unet"]
        functions = unet.get("functions", ["main"])
        sizes = [s["size"] for s in unet.get("sizes", [])]
        self._function = None
        if size is not None and functions != ["main"]:
            key = f"{size[0]}x{size[1]}"
            if key not in functions:
                # Long-prompt functions ("WxH-t154") share their size with "WxH": list sizes once.
                listed = list(dict.fromkeys(f.split("-t")[0] for f in functions))
                raise UsageError(f"The bundle's UNet has no {key} function.", where=self.bundle,
                                 fix=f"use one of its sizes: {', '.join(listed)}")
            self._function = key
        self._functions = functions
        self.sizes = sizes

        def make(path: Path, function=None):
            if runner != "coreml":
                return _Reference(path, function)
            if path.suffix == ".mlmodelc":
                return _CompiledCoreML(path, compute_unit)
            return _CoreML(path, function, compute_unit)

        self._text = make(self.layout.text_encoder)
        self._make = make
        self._unet_by_tokens = {77: [_ZeroResiduals(make(p, self._function)) for p in self.layout.unet]}
        vae = self._vae_function(components)
        self._decoder = make(self.layout.vae_decoder, vae.get("vae_decoder"))
        self._encoder = make(self.layout.vae_encoder, vae.get("vae_encoder")) if self.layout.vae_encoder else None
        sample_shape = self._unet_by_tokens[77][0].inputs["sample"][0]
        z_shape = self._decoder.inputs["z"][0]
        image_h = components["vae_decoder"]["io"]["outputs"]["image"]["shape"][2]
        self.traits = ModelTraits(
            family=family.name, prediction_type=self.manifest["prediction_type"],
            scheduler_config=family.scheduler_config(self.manifest["prediction_type"]),
            latent_channels=z_shape[1], unet_in_channels=sample_shape[1], vae_scale_factor=image_h // z_shape[2],
            scaling_factor=float(self.manifest.get("vae_scaling_factor", 0.18215)))
        self.latent_size = tuple(sample_shape[2:])

    def _vae_function(self, components: dict) -> dict[str, str | None]:
        """The VAE packages' function for the chosen UNet size (multi-size bundles hold one per size)."""
        chosen = {}
        for kind in ("vae_decoder", "vae_encoder"):
            functions = components.get(kind, {}).get("functions")
            if self._function is None or kind not in components:
                chosen[kind] = None
            elif functions and self._function in functions:
                chosen[kind] = self._function
            else:
                raise InputFileError(f"The bundle's {kind.replace('_', ' ')} has no {self._function} function "
                                     "(converted for one size only).", where=self.bundle,
                                     fix="convert again with the same --sizes to get one VAE function per size")
        return chosen

    # --- the four things a backend supplies
    def encode_tokens(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        if clip_skip != self.clip_skip:
            raise UsageError(f"This bundle's text encoder has clip skip {self.clip_skip} baked in; "
                             f"{clip_skip} was asked for.", where="--clip-skip",
                             fix=f"use --clip-skip {self.clip_skip}, or convert with --clip-skip {clip_skip}")
        rows = [self._text.predict({"input_ids": ids[i:i + 1].numpy().astype(np.float32)})["last_hidden_state"]
                for i in range(ids.shape[0])]
        return torch.from_numpy(np.concatenate(rows)).float()

    def predict_noise(self, latents, timestep, context):
        b, _, h, w = latents.shape
        if (h, w) != self.latent_size:
            raise UsageError(f"This bundle's UNet runs {self.latent_size[1] * self.traits.vae_scale_factor}x"
                             f"{self.latent_size[0] * self.traits.vae_scale_factor} images.",
                             where="--width/--height", fix="use the bundle's size, or convert for this size")
        parts = self._unet_parts(context.shape[1])
        ctx = context.permute(0, 2, 1).unsqueeze(2)  # (B, S, C) -> Apple's (B, C, 1, S)
        out = []
        for start in range(0, b, 2):  # Apple's UNet has batch 2 (uncond + cond); pad an odd tail
            idx = list(range(start, min(start + 2, b)))
            pair = idx + idx[:1] * (2 - len(idx))
            t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(2)
            noise = self._run_unet(parts, latents[pair], t, ctx[pair])
            out.append(noise[: len(idx)])
        return torch.cat(out)

    def _unet_parts(self, tokens: int) -> list:
        """The UNet parts for a context of `tokens` (77 per 75-token prompt chunk), loaded on first use:
        bundles converted with --prompt-chunks N hold a "WxH-t<tokens>" function per longer context."""
        if tokens not in self._unet_by_tokens:
            base = self._function or self._functions[0]
            name = f"{base}-t{tokens}"
            if name not in self._functions:
                longest = max([77] + [int(f.split("-t")[1]) for f in self._functions if f.startswith(f"{base}-t")])
                raise UsageError(f"The prompt needs {tokens // 77} chunks of 75 tokens; this bundle's UNet takes "
                                 f"up to {longest // 77} ({longest} tokens).", where="--prompt",
                                 fix=f"shorten the prompt to {75 * (longest // 77)} tokens, or convert with "
                                     f"--prompt-chunks {tokens // 77} --min-target macOS15")
            log.info("loading the UNet function %s for a %d-token prompt", name, tokens)
            self._unet_by_tokens[tokens] = [_ZeroResiduals(self._make(p, name)) for p in self.layout.unet]
        return self._unet_by_tokens[tokens]

    def _run_unet(self, parts, sample, timestep, ctx) -> torch.Tensor:
        values = {"sample": sample, "timestep": timestep, "encoder_hidden_states": ctx}
        values = {k: v.numpy().astype(np.float32) for k, v in values.items()}
        for part in parts:
            feed = {name: _as(values[name], dtype) for name, (_, dtype) in part.inputs.items()}
            values.update({k: np.asarray(v, dtype=np.float32) for k, v in part.predict(feed).items()})
        return torch.from_numpy(values["noise_pred"]).float()

    def decode(self, latents):
        images = [self._decoder.predict({"z": (latents[i:i + 1] / self.traits.scaling_factor).numpy()
                                         .astype(np.float32)})["image"] for i in range(latents.shape[0])]
        return torch.from_numpy(np.concatenate(images)).float()

    def encode_image(self, images):
        if self._encoder is None:
            raise UsageError("This bundle has no VAE encoder, which img2img and inpainting need.",
                             where=self.bundle, fix="convert again with --components ...,vae_encoder")
        out = [self._encoder.predict({"x": images[i:i + 1].numpy().astype(np.float32)})["latent"]
               for i in range(images.shape[0])]
        return torch.from_numpy(np.concatenate(out)).float()


def _as(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.astype(np.float16 if dtype == "fp16" else np.float32)
