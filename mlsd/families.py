"""Model families mlsd runs, and the defaults each one brings.

Family facts live here once; the loader translates a checkpoint into one of
these and nothing downstream looks at checkpoint keys again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parent / "data"

# The scheduler settings diffusers' single-file loading gives each family
# (runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 configs).
_SCHEDULER_BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2"
    label: str
    context_dim: int
    default_prediction: str  # "epsilon" | "v_prediction"
    default_size: int  # pixels, square
    tokenizer_pad: str
    text_layers_dropped: int  # SD2 runs its text encoder to the penultimate layer

    def ldm_config(self, inpainting: bool) -> dict:
        name = f"{self.name}-inpainting.yaml" if inpainting else f"{self.name}.yaml"
        return yaml.safe_load((DATA / "families" / name).read_text(encoding="utf-8"))

    def scheduler_config(self, prediction_type: str) -> dict:
        return {**_SCHEDULER_BASE, "prediction_type": prediction_type}


SD1 = Family("sd1", "Stable Diffusion 1.x", 768, "epsilon", 512, "<|endoftext|>", 0)
# Most SD2 checkpoints people download are 2.0/2.1 768-v; diffusers' single-file
# loading makes the same assumption. 512-base users set --prediction-type epsilon.
SD2 = Family("sd2", "Stable Diffusion 2.x", 1024, "v_prediction", 768, "!", 1)
FAMILIES = {f.name: f for f in (SD1, SD2)}


def tokenizer_dir() -> Path:
    return DATA / "clip_tokenizer"


def load_tokenizer(family: Family, folder: Path | None = None):
    """The CLIP BPE tokenizer, from the shipped files unless a model folder brings its own."""
    from transformers import CLIPTokenizer

    folder = folder or tokenizer_dir()
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token=family.tokenizer_pad,
        model_max_length=77,
    )
