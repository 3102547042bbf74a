"""Merge LoRAs into a diffusers UNet and CLIP text encoder(s), in place.

Every file is read and checked against the models before any weight changes, so a bad LoRA in the
list leaves the models untouched. Each module's ΔW carries its own alpha/rank: diffusers' kohya loader
assumes one alpha per file and mis-scales LoRAs whose alphas differ per module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlsd.errors import LoraError
from mlsd.lora.formats import LoraFile, LoraMetadata, LoraModule, list_examples, read_lora_file
from mlsd.lora.math import delta_weight, fits, natural_shape
from mlsd.lora.names import SDXL, ModuleIndex, lora_family, model_family, target_weight

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraSpec:
    """One LoRA to merge. A1111's ``<lora:name:te_w:unet_w>`` puts the text-encoder weight first."""

    path: Path
    unet_weight: float = 1.0
    te_weight: float | None = None  # None: same as unet_weight

    @classmethod
    def from_a1111(cls, path: Path, te_weight: float = 1.0, unet_weight: float | None = None) -> LoraSpec:
        """``<lora:name:a>`` -> both weights a; ``<lora:name:a:b>`` -> text encoder a, UNet b."""
        return cls(Path(path), te_weight if unet_weight is None else unet_weight, te_weight)

    @property
    def text_encoder_weight(self) -> float:
        return self.unet_weight if self.te_weight is None else self.te_weight


@dataclass(frozen=True)
class LoraResult:
    path: Path
    unet_weight: float
    te_weight: float
    unet_modules: int
    text_encoder_modules: int  # both encoders together on SDXL
    formats: tuple[str, ...]
    family: str | None
    metadata: LoraMetadata
    ignored_keys: tuple[str, ...] = ()
    skipped_text_encoder_modules: int = 0  # te weight 0 and no text encoder given

    def describe(self) -> str:
        line = (f"{self.path.name}: {self.unet_modules} UNet + {self.text_encoder_modules} text-encoder modules "
                f"({', '.join(self.formats)}), weights unet {self.unet_weight:g} / te {self.te_weight:g}")
        if self.ignored_keys:
            line += f"; ignored {len(self.ignored_keys)} bundled-embedding keys"
        if self.skipped_text_encoder_modules:
            line += f"; skipped {self.skipped_text_encoder_modules} text-encoder modules (no text encoder)"
        return line


@dataclass
class MergeReport:
    loras: list[LoraResult]

    def describe(self) -> str:
        return "\n".join(r.describe() for r in self.loras)


@dataclass
class _Planned:
    spec: LoraSpec
    lora: LoraFile
    targets: list[tuple[str, str, LoraModule]]  # (model key, module name, LoRA module)
    family: str | None
    skipped: int


def apply_loras(unet: nn.Module, text_encoder: nn.Module | None, specs: list[LoraSpec], *,
                text_encoder_2: nn.Module | None = None) -> MergeReport:
    """Merge ``specs`` into the models in place (W += weight · ΔW, in float32, cast back)."""
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    indexes = {k: ModuleIndex.build(m, is_unet=k == "unet") for k, m in models.items() if m is not None}
    family = model_family(unet, text_encoder_2)
    plans = [_plan(read_lora_file(s.path), s, indexes, family) for s in specs]

    updates: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for p in plans:
        for model_key, name, m in p.targets:
            w = p.spec.unet_weight if model_key == "unet" else p.spec.text_encoder_weight
            if w != 0:  # skipping keeps weight-0 parameters bit-identical
                updates.setdefault((model_key, name), []).append((m, float(w)))
    with torch.no_grad():
        for (model_key, name), items in updates.items():
            param = target_weight(indexes[model_key].modules[name])
            total = sum(w * delta_weight(m, param.shape).to(param.device) for m, w in items)
            param.copy_((param.float() + total).to(param.dtype))
    return MergeReport([_result(p) for p in plans])


def _plan(lora: LoraFile, spec: LoraSpec, indexes: dict[str, ModuleIndex], family: str) -> _Planned:
    path = lora.path
    lfamily, evidence = lora_family(lora)
    if lfamily == SDXL and family != SDXL:
        raise LoraError(f"{path.name} is an SDXL LoRA ({evidence}); this model is {family}, and SDXL LoRAs "
                        "cannot be applied to SD1/SD2 models", where=path,
                        fix=f"use a LoRA trained for {family} (its Civitai page lists the base model)")
    hint = f"The file looks made for {lfamily} ({evidence})." if lfamily else f"mlsd cannot tell: {evidence}."

    targets, unmatched, no_encoder, bad_shape, bad_kind = [], [], [], [], []
    seen: dict[tuple[str, str], str] = {}
    for m in lora.modules:
        keys = _candidate_models(m, indexes)
        if not keys and m.target in _TEXT_ENCODERS:
            no_encoder.append(m.key)
            continue
        hit = next(((k, n) for k in keys if (n := indexes[k].resolve(m)) is not None), None)
        if hit is None and m.target == "auto" and m.name.startswith("text_model.") and "text_encoder" not in indexes:
            no_encoder.append(m.key)
            continue
        if hit is None:
            unmatched.append(m.key)
            continue
        if hit in seen:
            raise LoraError(f"{path.name} has two entries for the same module {hit[1]}: {seen[hit]} and {m.key}",
                            where=path, fix="the file mixes two naming styles; re-export it")
        seen[hit] = m.key
        weight = target_weight(indexes[hit[0]].modules[hit[1]])
        if weight is None:
            bad_kind.append(f"{m.key} ({type(indexes[hit[0]].modules[hit[1]]).__name__})")
            continue
        try:
            shape = natural_shape(m)
        except LoraError as exc:
            raise LoraError(exc.what, where=path, fix="the file is damaged; re-download or re-export it") from None
        if not fits(shape, tuple(weight.shape)):
            bad_shape.append(f"{hit[1]}: LoRA {shape} vs model {tuple(weight.shape)}")
        targets.append((hit[0], hit[1], m))

    if unmatched:
        raise LoraError(f"{len(unmatched)} of {len(lora.modules)} modules in {path.name} match nothing in the "
                        f"model ({family}): {list_examples(unmatched)}. {hint}", where=path,
                        fix=f"use a LoRA made for {family}, or report the key names if it is one")
    if bad_kind:
        raise LoraError(f"{path.name} targets layers that LoRA merging does not support: {list_examples(bad_kind)}",
                        where=path, fix="use a LoRA that targets only linear and convolution layers")
    if bad_shape:
        raise LoraError(f"LoRA for another model family: {len(bad_shape)} of {len(targets)} modules of "
                        f"{path.name} do not fit the model ({family}): {list_examples(bad_shape, 5)}. {hint}",
                        where=path, fix=f"use a LoRA trained for {family}")
    if no_encoder and spec.text_encoder_weight != 0:
        raise LoraError(f"{path.name} has {len(no_encoder)} text-encoder modules but no text encoder was given "
                        f"(e.g. {no_encoder[0]})", where=path,
                        fix="load the model's text encoder, or set the LoRA's text-encoder weight to 0")
    return _Planned(spec, lora, targets, lfamily, len(no_encoder))


def _candidate_models(m: LoraModule, indexes: dict[str, ModuleIndex]) -> list[str]:
    if m.target == "auto":  # PEFT's base_model.model. names do not say which model they belong to
        return [k for k in ("unet", "text_encoder") if k in indexes]
    return [m.target] if m.target in indexes else []


def _result(p: _Planned) -> LoraResult:
    counts = Counter("unet" if k == "unet" else "te" for k, _, _ in p.targets)
    return LoraResult(Path(p.spec.path), float(p.spec.unet_weight), float(p.spec.text_encoder_weight),
                      counts["unet"], counts["te"], tuple(sorted({m.format for _, _, m in p.targets})),
                      p.family, p.lora.summary, tuple(p.lora.ignored_keys), p.skipped)

