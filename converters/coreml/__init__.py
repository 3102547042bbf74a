"""Core ML conversion of Stable Diffusion components (ANE-friendly PyTorch modules live in `ane`)."""
