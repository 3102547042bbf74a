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


def load_backend(key: ModelKey):
    from mlsd.backends.torch_backend import TorchBackend
    from mlsd.checkpoints.load import load_model
    from mlsd.lora import LoraSpec, apply_loras

    model = load_model(key.path, prediction_type=key.prediction_type, use_ema=key.ema, vae=key.vae)
    if key.loras:
        report = apply_loras(model.unet, model.text_encoder,
                             [LoraSpec(c.path, c.unet_weight, c.te_weight) for c in key.loras])
        model.loras = list(key.loras)
        log.info("merged LoRAs:\n%s", report.describe())
    return TorchBackend(model, key.device, key.precision)
