"""Resolve what a user named (model, VAE, LoRAs) and hold a loaded backend between generations.

Shared by the CLI and the terminal UI, so both resolve names and apply LoRAs
the same way, and the UI does not reload a 2 GB checkpoint for every image.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mlsd.errors import UsageError
from mlsd.paths import ModelsDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraChoice:
    path: Path
    unet_weight: float = 1.0
    te_weight: float | None = None


def parse_lora_option(text: str) -> tuple[str, float, float | None]:
    """'NAME', 'NAME:W' or 'NAME:TE_W:UNET_W' (A1111 order); names may contain ':' (paths), weights may not."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    name = ":".join(parts).strip()
    if not name:
        raise UsageError(f"LoRA option '{text}' has no name.", where="--lora", fix="use NAME:WEIGHT, e.g. style:0.8")
    if not numbers:
        return name, 1.0, None
    if len(numbers) == 1:
        return name, numbers[0], None
    return name, numbers[1], numbers[0]


def resolve_loras(root: ModelsDir, options: list[str], prompt_tags: list = ()) -> list[LoraChoice]:
    """--lora options plus <lora:name:w> prompt tags, resolved in the models directory."""
    choices = []
    for text in options:
        name, unet_w, te_w = parse_lora_option(text)
        choices.append(LoraChoice(root.resolve(name, "lora"), unet_w, te_w))
    for tag in prompt_tags:
        choices.append(LoraChoice(root.resolve(tag.name, "lora"), tag.unet_weight, tag.te_weight))
    return choices


@dataclass(frozen=True)
class ModelKey:
    """Everything that changes the weights in memory: a different key means a reload."""

    path: Path
    vae: Path | None = None
    loras: tuple[LoraChoice, ...] = ()
    prediction_type: str | None = None
    ema: bool = False
    device: str = "auto"
    precision: str | None = None
    backend: str = "auto"  # auto | torch | coreml | coreml-reference
    compute_unit: str = "auto"
    size: tuple[int, int] | None = None  # picks the function of a multi-size Core ML bundle
    family: str | None = None  # for Core ML folders converted elsewhere whose text width names no family
    compile: bool = False  # torch: torch.compile the UNet (frozen weights on CPU)


@dataclass
class ModelCache:
    """Keeps the most recent backend; LoRAs are merged into weights, so another LoRA set reloads."""

    _key: ModelKey | None = None
    _backend: object | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def backend(self, key: ModelKey):
        with self._lock:
            if key != self._key:
                self._backend = None  # free the old weights before loading the new ones
                self._backend = load_backend(key)
                self._key = key
            return self._backend


BACKENDS = ("auto", "torch", "coreml", "coreml-reference")


def choose_backend(key: ModelKey) -> tuple[str, Path, str]:
    """(backend, path to load, why). Bundles run on Core ML where it exists; elsewhere on their recorded
    source checkpoint when it is still there (exact, and faster than the reference executor)."""
    import json
    import sys

    from mlsd.backends.coreml_backend import is_bundle, is_coreml_model

    if key.backend not in BACKENDS:
        raise UsageError(f"Unknown backend '{key.backend}'.", where="--backend", fix=f"use {', '.join(BACKENDS)}")
    if not is_bundle(key.path) and is_coreml_model(key.path):
        return _choose_for_foreign(key, sys.platform)
    if not is_bundle(key.path):
        if key.backend in ("coreml", "coreml-reference"):
            raise UsageError(f"--backend {key.backend} needs a Core ML bundle, and this is a checkpoint.",
                             where=key.path, fix="convert it first (mlsd convert), or use --backend torch")
        return "torch", key.path, "a checkpoint runs on PyTorch"
    if key.loras:
        raise UsageError("LoRAs cannot be added to a Core ML bundle at run time: they are merged into its weights.",
                         where=key.path, fix="convert with --lora NAME:WEIGHT, or generate from the checkpoint")
    if key.backend in ("coreml", "coreml-reference"):
        return key.backend, key.path, "asked for"
    source = Path(json.loads((key.path / "mlsd.json").read_text())["source"]["path"])
    if key.backend == "auto" and sys.platform == "darwin":
        return "coreml", key.path, "Core ML is available on macOS"
    if source.is_file() or source.is_dir():
        return "torch", source, f"Core ML is not available here; running the bundle's source checkpoint {source}"
    if key.backend == "torch":
        raise UsageError("--backend torch needs the bundle's source checkpoint, which is gone.",
                         where=source, fix="use --backend coreml-reference, or restore the checkpoint")
    return "coreml-reference", key.path, "Core ML is not available here and the source checkpoint is gone"


def _choose_for_foreign(key: ModelKey, platform: str) -> tuple[str, Path, str]:
    """Core ML models converted elsewhere have no source checkpoint to fall back on."""
    if key.loras:
        raise UsageError("LoRAs cannot be added to Core ML models at run time: they are merged into the weights.",
                         where=key.path, fix="generate from a checkpoint with --lora, or convert one with it")
    if key.backend == "torch":
        raise UsageError("--backend torch needs a checkpoint; this folder holds Core ML models converted elsewhere.",
                         where=key.path, fix="use --backend coreml-reference (any OS) or --backend coreml (macOS)")
    if key.backend in ("coreml", "coreml-reference"):
        return key.backend, key.path, "asked for"
    if platform == "darwin":
        return "coreml", key.path, "Core ML is available on macOS"
    return "coreml-reference", key.path, ("Core ML models converted elsewhere and Core ML is not available here: "
                                          "the reference executor runs them (slow)")


def load_backend(key: ModelKey, choice: tuple[str, Path, str] | None = None):
    """The backend for `key`; `choice` is `choose_backend(key)` where the caller already made it."""
    from mlsd.backends.torch_backend import TorchBackend
    from mlsd.checkpoints.load import load_model
    from mlsd.lora import LoraSpec, apply_loras

    backend, path, why = choice or choose_backend(key)
    log.info("backend %s: %s", backend, why)
    if backend != "torch":
        from mlsd.backends.coreml_backend import CoreMLBackend

        if key.compile:
            raise UsageError(f"--compile applies to the torch backend; this runs on {backend}.",
                             where="--compile", fix="drop --compile, or use --backend torch with a checkpoint")

        runner = "coreml" if backend == "coreml" else "reference"
        return CoreMLBackend(path, runner=runner, compute_unit=key.compute_unit, size=key.size, family=key.family,
                             prediction_type=key.prediction_type)
    if path != key.path:
        import json

        manifest = json.loads((key.path / "mlsd.json").read_text())
        vae = Path(manifest["vae"]["path"]) if manifest.get("vae") else key.vae
        loras = tuple(LoraChoice(Path(x["path"]), x["unet_weight"], x["te_weight"]) for x in manifest["loras"])
        key = ModelKey(path, vae, loras, manifest.get("prediction_type"), bool(manifest.get("ema")),
                       key.device, key.precision, compile=key.compile)
    model = load_model(key.path, prediction_type=key.prediction_type, use_ema=key.ema, vae=key.vae)
    if key.loras:
        report = apply_loras(model.unet, model.text_encoder,
                             [LoraSpec(c.path, c.unet_weight, c.te_weight) for c in key.loras])
        model.loras = list(key.loras)
        log.info("merged LoRAs:\n%s", report.describe())
    return TorchBackend(model, key.device, key.precision, compile_unet=key.compile)
