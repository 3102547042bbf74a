"""LoRA files (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, diffusers/PEFT) merged into diffusers/transformers models."""

from mlsd.lora.formats import LoraFile, LoraMetadata, LoraModule, parse_lora, read_lora_file
from mlsd.lora.math import delta_weight
from mlsd.lora.merge import LoraResult, LoraSpec, MergeReport, apply_loras

__all__ = [
    "LoraFile", "LoraMetadata", "LoraModule", "LoraResult", "LoraSpec", "MergeReport",
    "apply_loras", "delta_weight", "parse_lora", "read_lora_file",
]
