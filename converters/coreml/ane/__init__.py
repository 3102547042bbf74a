"""Apple-Neural-Engine-friendly Stable Diffusion UNet that loads diffusers weights."""

from converters.coreml.ane.attention import AttentionImpl
from converters.coreml.ane.unet import AneUNet
from converters.coreml.ane.weights import convert_diffusers_state_dict, map_diffusers_key

__all__ = ["AneUNet", "AttentionImpl", "convert_diffusers_state_dict", "map_diffusers_key"]
