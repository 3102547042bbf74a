"""Init images, masks and outpainting canvases, prepared the way A1111 and diffusers do."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from mlsd.pipeline.request import GenerationRequest


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just-resize") -> Image.Image:
    """A1111's resize modes: stretch, crop to fill, or fit and fill the borders from the edges."""
    image = image.convert("RGB")
    if mode == "just-resize" or image.size == (width, height):
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == "crop-and-resize"
    if (ratio > src_ratio) == cover:
        w, h = width, max(1, round(image.height * width / image.width))
    else:
        w, h = max(1, round(image.width * height / image.height)), height
    resized = image.resize((w, h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    canvas.paste(resized, (left, top))
    if cover:
        return canvas
    return Image.fromarray(_edge_fill(np.asarray(canvas), left, top, w, h))


def _edge_fill(arr: np.ndarray, left: int, top: int, w: int, h: int) -> np.ndarray:
    """Stretch the pasted image's outermost rows/columns over the empty border."""
    inner = arr[top:top + h, left:left + w]
    pad = ((top, arr.shape[0] - top - h), (left, arr.shape[1] - left - w), (0, 0))
    return np.pad(inner, pad, mode="edge")


def open_image(path, what: str = "image", option: str = "image") -> Image.Image:
    """Read an init image or mask fully into memory, with one clear error for a missing or broken file."""
    from pathlib import Path

    from PIL import UnidentifiedImageError

    from mlsd.errors import InputFileError

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputFileError(f"{what.capitalize()} not found.", where=path, fix=f"check the {option} path")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise InputFileError(f"Cannot read the {what} ({e}).", where=path, fix="use a PNG, JPEG or WebP file") from e


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def prepare_init_image(request: GenerationRequest) -> torch.Tensor:
    return to_tensor(resize_image(request.init_image, request.width, request.height, request.resize_mode))


def outpaint_canvas(image: Image.Image, pads: tuple[int, int, int, int]) -> tuple[Image.Image, Image.Image]:
    """Extend the image by (left, right, up, down) pixels of edge colour; the mask covers the new area."""
    left, right, up, down = pads
    arr = np.pad(np.asarray(image.convert("RGB")), ((up, down), (left, right), (0, 0)), mode="edge")
    mask = np.full(arr.shape[:2], 255, dtype=np.uint8)
    mask[up:up + image.height, left:left + image.width] = 0
    return Image.fromarray(arr), Image.fromarray(mask, mode="L")


def soft_mask(mask: Image.Image, width: int, height: int, blur: int) -> Image.Image:
    """The mask at the image size with A1111's mask blur: what the overlay uses to blend edges."""
    mask = mask.convert("L").resize((width, height), Image.LANCZOS)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def prepare_mask(mask: Image.Image, width: int, height: int, blur: int) -> torch.Tensor:
    """White = repaint. Resized, blurred (A1111 mask blur) and binarised at 0.5 like diffusers' mask processor."""
    arr = np.asarray(soft_mask(mask, width, height, blur)).astype(np.float32) / 255.0
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]


def inpaint_inputs(request: GenerationRequest) -> tuple[Image.Image, Image.Image]:
    """The init image and mask at the request size (outpainting grows the canvas beforehand)."""
    image = resize_image(request.init_image, request.width, request.height, request.resize_mode)
    if request.outpaint:
        image, mask = outpaint_canvas(image, request.outpaint)
        if request.mask is not None:
            user = Image.new("L", image.size, 0)
            user.paste(request.mask.convert("L").resize((request.width, request.height)),
                       (request.outpaint[0], request.outpaint[2]))
            mask = Image.fromarray(np.maximum(np.asarray(mask), np.asarray(user)))
        return image, mask
    return image, request.mask


def prepare_inpaint(request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = inpaint_inputs(request)
    return to_tensor(image), prepare_mask(mask, image.width, image.height, request.mask_blur)


def overlay_original(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 pastes the original back where the mask is black, so unmasked pixels never go through the VAE."""
    alpha = np.asarray(mask.convert("L")).astype(np.float32)[..., None] / 255.0
    out = np.asarray(generated.convert("RGB")).astype(np.float32) * alpha
    out += np.asarray(original.convert("RGB")).astype(np.float32) * (1.0 - alpha)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def overlay_inpaint(images: list[Image.Image], request: GenerationRequest) -> list[Image.Image]:
    original, mask = inpaint_inputs(request)
    soft = soft_mask(mask, original.width, original.height, request.mask_blur)
    return [overlay_original(im, original, soft) for im in images]


def image_psnr(a, b) -> float:
    """PSNR in dB between two 8-bit images (PIL images or arrays), peak 255; 100 when identical."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(((a - b) ** 2).mean())
    return 100.0 if mse == 0 else 10 * float(np.log10(255.0**2 / mse))
