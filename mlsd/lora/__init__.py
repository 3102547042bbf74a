"""LoRA files (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, diffusers/PEFT) merged into diffusers/transformers models."""

from mlsd.lora.formats import LoraFile, LoraMetadata, LoraModule, parse_lora, read_lora_file
from mlsd.lora.math import delta_weight
from mlsd.lora.merge import LoraResult, LoraSpec, MergeReport, apply_loras


def describe_lora(weights) -> dict:
    """`mlsd inspect` fields for a LoRA: format, ranks, targets, kohya metadata, A1111 hash."""
    from collections import Counter
    from dataclasses import asdict

    from mlsd.hashes import lora_short_hash
    from mlsd.lora.math import rank

    lora = parse_lora(weights.tensors, weights.metadata, weights.path)
    ranks = Counter(r for r in (rank(m) for m in lora.modules) if r is not None)
    targets = Counter(m.target for m in lora.modules)
    meta = {k: v for k, v in asdict(lora.summary).items() if v is not None}
    return {"format": ", ".join(lora.formats), "ranks": dict(sorted(ranks.items())),
            "modules": dict(targets), "metadata": meta, "short_hash": lora_short_hash(weights.path)}

__all__ = [
    "LoraFile", "LoraMetadata", "LoraModule", "LoraResult", "LoraSpec", "MergeReport",
    "apply_loras", "delta_weight", "describe_lora", "parse_lora", "read_lora_file",
]
