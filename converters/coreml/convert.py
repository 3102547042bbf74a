"""`mlsd convert`: checkpoint (+ LoRAs, VAE) -> a Core ML bundle, one component at a time.

Each stage: skip if the published bundle holds it from the same recipe, build
the ANE-friendly module, export, convert, (quantize, chunk), save, log timing.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from converters.coreml.bundle import BundleWriter, check_free_space, recipe_hash, unet_package_names
from mlsd.errors import UsageError

log = logging.getLogger(__name__)
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
ATTENTIONS = ("split_einsum", "split_einsum_v2", "original")
TARGETS = ("macOS13", "macOS14", "macOS15", "iOS16", "iOS17", "iOS18")
MULTIFUNCTION_TARGETS = ("macOS15", "iOS18")

StageCallback = Callable[[str, str, float], None]  # (component, "start"|"done"|"reused", seconds)


@dataclass
class ConvertOptions:
    attention: str = "split_einsum"
    chunks: int = 2
    quantize_bits: int | None = None
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(512, 512)])  # (width, height)
    components: tuple[str, ...] = COMPONENTS
    min_target: str = "macOS14"
    clip_skip: int = 1
    resources: bool = False
    prompt_chunks: int = 1  # UNet functions for 1..N chunks of 75 prompt tokens (A1111's long prompts)

    def validate(self) -> None:
        if self.attention not in ATTENTIONS:
            raise UsageError(f"Unknown attention '{self.attention}'.", where="--attention",
                             fix=f"use one of: {', '.join(ATTENTIONS)}")
        if not 1 <= self.chunks <= 8:
            raise UsageError(f"--chunks {self.chunks} is outside 1-8.", where="--chunks", fix="use 1 to 8 (2 is usual)")
        if self.quantize_bits not in (None, 8, 6, 4):
            raise UsageError(f"--quantize-bits {self.quantize_bits} is not supported.", where="--quantize-bits",
                             fix="use none, 8, 6 or 4")
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise UsageError(f"Unknown component(s): {', '.join(unknown) or '(none given)'}.",
                             where="--components", fix=f"choose from {', '.join(COMPONENTS)}")
        if self.min_target not in TARGETS:
            raise UsageError(f"Unknown deployment target '{self.min_target}'.", where="--min-target",
                             fix=f"use one of: {', '.join(TARGETS)}")
        for w, h in self.sizes:
            if w % 64 or h % 64 or w <= 0 or h <= 0:
                raise UsageError(f"Size {w}x{h} is not a multiple of 64.", where="--sizes/--width/--height",
                                 fix="use sizes such as 512x512, 512x768, 768x512")
        if len(self.sizes) > 1 and self.min_target not in MULTIFUNCTION_TARGETS:
            raise UsageError(
                f"Several sizes need a multifunction package, which Core ML supports from macOS15/iOS18; "
                f"--min-target is {self.min_target}.", where="--sizes", fix="add --min-target macOS15, or one size")
        if not 1 <= self.prompt_chunks <= 4:
            raise UsageError(f"--prompt-chunks {self.prompt_chunks} is outside 1-4.", where="--prompt-chunks",
                             fix="use 1 (75 tokens, the usual) to 4 (300 tokens)")
        if self.prompt_chunks > 1 and self.min_target not in MULTIFUNCTION_TARGETS:
            raise UsageError(
                f"Long prompts need one UNet function per prompt length (a multifunction package), which Core ML "
                f"supports from macOS15/iOS18; --min-target is {self.min_target}.", where="--prompt-chunks",
                fix="add --min-target macOS15, or drop --prompt-chunks")
        if self.resources and sys.platform != "darwin":
            raise UsageError("--resources compiles .mlmodelc folders, which needs macOS (Core ML's compiler).",
                             where="--resources", fix="run the conversion on a Mac, or drop --resources")
        if self.resources and self.chunks > 2:
            raise UsageError("Apple's Swift pipeline and MochiDiffusion load at most two UNet chunks.",
                             where="--resources", fix="use --chunks 1 or 2 with --resources")

    def tag(self) -> str:
        w, h = self.sizes[0]
        size = f"{w}x{h}" if len(self.sizes) == 1 else f"{len(self.sizes)}sizes"
        return (f"{self.attention}-{size}" + (f"-t{75 * self.prompt_chunks}" if self.prompt_chunks > 1 else "")
                + (f"-q{self.quantize_bits}" if self.quantize_bits else ""))

    def unet_functions(self) -> list[tuple[str, tuple[int, int], int]]:
        """(function name, (width, height), context tokens) for every UNet function: "main" alone for
        one size and one prompt chunk; else "WxH", and "WxH-t<tokens>" for the longer contexts."""
        if len(self.sizes) == 1 and self.prompt_chunks == 1:
            return [("main", self.sizes[0], 77)]
        return [(f"{w}x{h}" + (f"-t{77 * k}" if k > 1 else ""), (w, h), 77 * k)
                for w, h in self.sizes for k in range(1, self.prompt_chunks + 1)]


def default_bundle_path(models_root: Path, checkpoint: Path, lora_paths: list[Path], options: ConvertOptions) -> Path:
    stem = "-".join([_stem(checkpoint), *(_stem(p) for p in lora_paths)])
    return models_root / "Core-ML" / f"{stem}-{options.tag()}"


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _target(name: str):
    import coremltools as ct

    return getattr(ct.target, name)


def convert_checkpoint(
    checkpoint: Path,
    bundle: Path,
    *,
    options: ConvertOptions,
    loras: list = (),
    vae: Path | None = None,
    prediction_type: str | None = None,
    ema: bool = False,
    on_stage: StageCallback | None = None,
) -> Path:
    """Convert and publish the bundle; returns its path. Nothing is written before the model loads safely."""
    from converters.coreml.export import release_memory
    from mlsd import __version__
    from mlsd.checkpoints.load import load_model
    from mlsd.families import tokenizer_dir
    from mlsd.hashes import file_sha256, lora_short_hash, model_short_hash

    options.validate()
    on_stage = on_stage or (lambda *a: None)
    t0 = time.perf_counter()
    # The file's own dtype (fp16 for most downloads): an fp32 copy of every component would double the
    # peak memory, and each stage makes the fp32 module it exports from itself, one at a time.
    model = load_model(checkpoint, prediction_type=prediction_type, use_ema=ema, vae=vae, dtype=None)
    if loras:
        from mlsd.lora import LoraSpec, apply_loras

        apply_loras(model.unet, model.text_encoder, [LoraSpec(c.path, c.unet_weight, c.te_weight) for c in loras])
    load_seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())
    check_free_space(bundle.parent, int(n_params * 2 * 1.3 * len(options.sizes) ** 0.5) + 2**26)

    source_hash = file_sha256(checkpoint) if checkpoint.is_file() else _stem(checkpoint)
    base = {
        "mlsd": __version__, "source_sha256": source_hash, "ema": ema,
        "loras": [(lora_short_hash(c.path), c.unet_weight, c.te_weight) for c in loras],
        "vae": file_sha256(vae) if vae else None, "prediction_type": model.prediction_type,
        "min_target": options.min_target,
    }
    writer = BundleWriter(bundle)
    try:
        writer.manifest.update({
            "source": {"path": str(checkpoint), "sha256": source_hash,
                       "a1111_hash": model_short_hash(checkpoint) if checkpoint.is_file() else None},
            "family": model.family.name, "inpainting": model.inpainting,
            "prediction_type": model.prediction_type, "ema": ema,
            "loras": [{"path": str(c.path), "unet_weight": c.unet_weight, "te_weight": c.te_weight,
                       "hash": lora_short_hash(c.path)} for c in loras],
            "vae": {"path": str(vae), "sha256": base["vae"]} if vae else None,
            "options": asdict(options) | {"sizes": [f"{w}x{h}" for w, h in options.sizes]},
            "clip_skip": options.clip_skip, "tools": _tool_versions(), "load_seconds": round(load_seconds, 3),
            "vae_scaling_factor": model.vae.config.scaling_factor,
        })
        for component in COMPONENTS:
            recipe = recipe_hash(base | _component_recipe(component, options))
            if writer.reusable(component, recipe):
                # Also keeps components the user did not ask for this time, when they still fit.
                writer.carry_over(component)
                on_stage(component, "reused", 0.0)
                continue
            if component not in options.components:
                continue
            on_stage(component, "start", 0.0)
            start = time.perf_counter()
            files, extra = _STAGES[component](model, options, writer)
            seconds = time.perf_counter() - start
            writer.record(component, recipe, files, seconds, **extra)
            on_stage(component, "done", seconds)
            release_memory()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy2(tokenizer_dir() / name, writer.path(name))
        writer.manifest["components_present"] = list(writer.manifest["components"])
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _component_recipe(component: str, options: ConvertOptions) -> dict:
    sizes = [list(s) for s in options.sizes]
    if component == "text_encoder":
        return {"component": component, "clip_skip": options.clip_skip}
    if component == "unet":
        return {"component": component, "attention": options.attention, "chunks": options.chunks,
                "bits": options.quantize_bits, "sizes": sizes, "prompt_chunks": options.prompt_chunks}
    return {"component": component, "sizes": sizes}


def _tool_versions() -> dict:
    import coremltools
    import diffusers
    import torch
    import transformers

    return {"coremltools": coremltools.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def _stage_text_encoder(model, options: ConvertOptions, writer: BundleWriter):
    from converters.coreml.components import convert_text_encoder, describe_io
    from converters.coreml.export import save_package
    from mlsd.memory import drop_file_pages, release_memory, tensor_ranges

    source = tensor_ranges(model.text_encoder.state_dict().values())  # memory-mapped, before .float()
    mlmodel = convert_text_encoder(model.text_encoder.float(), clip_skip=options.clip_skip,
                                   minimum_target=_target(options.min_target))
    save_package(mlmodel, writer.path("TextEncoder.mlpackage"))
    model.text_encoder = None  # no later stage needs it; the UNet stage wants the memory
    release_memory()
    drop_file_pages(source)
    return ["TextEncoder.mlpackage"], {"io": describe_io(mlmodel)}


def _stage_vae(kind: str):
    def stage(model, options: ConvertOptions, writer: BundleWriter):
        import tempfile

        from converters.coreml.components import convert_vae_decoder, convert_vae_encoder, describe_io
        from converters.coreml.export import save_multifunction, save_package

        factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        model.vae.float()
        name = "VAEDecoder.mlpackage" if kind == "vae_decoder" else "VAEEncoder.mlpackage"

        def convert(w: int, h: int):
            if kind == "vae_decoder":
                return convert_vae_decoder(model.vae, (h // factor, w // factor),
                                           minimum_target=_target(options.min_target))
            return convert_vae_encoder(model.vae, (h, w), minimum_target=_target(options.min_target))

        if len(options.sizes) == 1:
            mlmodel = convert(*options.sizes[0])
            save_package(mlmodel, writer.path(name))
            return [name], {"io": describe_io(mlmodel)}
        # Several sizes: one function per size, like the UNet, so every size decodes (and encodes).
        with tempfile.TemporaryDirectory(dir=writer.work) as scratch:
            parts, io = {}, None
            for w, h in options.sizes:
                mlmodel = convert(w, h)
                io = io or describe_io(mlmodel)
                parts[f"{w}x{h}"] = save_package(mlmodel, Path(scratch) / f"{w}x{h}" / name)
            save_multifunction(parts, writer.path(name))
        return [name], {"io": io, "functions": list(parts)}

    return stage


def _stage_unet(model, options: ConvertOptions, writer: BundleWriter):
    from converters.coreml.unet import convert_unet

    return convert_unet(model, options, writer)  # it releases model.unet: no later stage needs it


_STAGES = {"text_encoder": _stage_text_encoder, "unet": _stage_unet,
           "vae_decoder": _stage_vae("vae_decoder"), "vae_encoder": _stage_vae("vae_encoder")}
__all__ = ["ConvertOptions", "convert_checkpoint", "default_bundle_path", "unet_package_names"]
