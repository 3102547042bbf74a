"""mlsd: Stable Diffusion checkpoints people download, on Core ML or PyTorch."""

__version__ = "0.1.0"
