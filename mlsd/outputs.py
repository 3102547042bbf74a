"""Saving generated images the A1111 way: dated folders, numbered names, the ``parameters`` text.

Layout, names and grids follow AUTOMATIC1111's defaults (``modules/images.py`` ``save_image`` and
``image_grid``) so tools that browse an A1111 ``outputs`` folder browse ours:

    outputs/txt2img-images/2024-05-01/00008-1234.png     NNNNN-SEED, counter per folder
    outputs/txt2img-grids/2024-05-01/grid-0003.png       A1111's short grid name

Every file is written to a temp file, synced and then moved into place, so a crash or a full disk
never leaves a truncated image under a real name.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from mlsd import __version__
from mlsd.errors import UsageError
from mlsd.hashes import lora_short_hash, model_short_hash
from mlsd.infotext import GenerationParams, exif_with_parameters, png_pnginfo
from mlsd.pipeline.samplers import resolve_sampler
from mlsd.prompts import extract_extra_networks

if TYPE_CHECKING:
    from mlsd.pipeline.request import GenerationRequest, GenerationResult

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_MAX_TRIES = 500  # A1111 gives up after as many taken numbers
_OVERWRITE_FIX = "pass --overwrite to replace it, or choose another --output"


@dataclass
class ModelStamp:
    """What the infotext says about the model: checkpoint, swapped-in VAE and LoRAs, with hashes."""

    name: str
    hash: str | None
    vae_name: str | None = None
    vae_hash: str | None = None
    loras: dict[str, float] = field(default_factory=dict)  # name -> weight
    lora_hashes: dict[str, str] = field(default_factory=dict)  # name -> 12-char short hash

    @classmethod
    def from_paths(cls, checkpoint_path: str | os.PathLike, vae_path: str | os.PathLike | None = None,
                   loras: Iterable[tuple[str | os.PathLike, float]] = (), *,
                   cache: bool | str | os.PathLike = True) -> ModelStamp:  # fmt: skip
        """Hash the files through the hash cache. Names as A1111 writes them: the checkpoint's and
        LoRAs' stems, the VAE's file name with its extension."""
        ckpt = Path(checkpoint_path)
        vae = Path(vae_path) if vae_path is not None else None
        weights, hashes = {}, {}
        for path, weight in loras:
            name = Path(path).stem
            weights[name] = float(weight)
            hashes[name] = lora_short_hash(path, cache=cache)
        vae_name, vae_hash = (vae.name, _short_hash(vae, cache)) if vae else (None, None)
        return cls(ckpt.stem, _short_hash(ckpt, cache), vae_name, vae_hash, weights, hashes)


def _short_hash(path: Path, cache: bool | str | os.PathLike) -> str | None:
    # A converted Core ML package is a folder: it has no single file for A1111's hash to describe.
    return None if path.is_dir() else model_short_hash(path, cache=cache)


@dataclass
class SavedImages:
    paths: list[Path]
    grid: Path | None
    infotexts: list[str]  # one per image; the grid carries the first


def _canonical_sampler(name: str) -> str:
    try:
        return resolve_sampler(name).name  # fixes case: "dpm++ 2m karras" -> "DPM++ 2M Karras"
    except UsageError:
        return name


def _prompt_with_loras(prompt: str, loras: dict[str, float]) -> str:
    """LoRAs given outside the prompt become ``<lora:name:w>`` tags so A1111 reproduces the image."""
    _, tags = extract_extra_networks(prompt)
    # A tag may name the file as "detail", "detail.safetensors" or "sub/detail": all mean that LoRA.
    named = [Path(t.args[0].strip()) for t in tags if t.kind in ("lora", "lyco") and t.args]
    mentioned = {n.lower() for p in named for n in (p.name, p.stem)}
    extra = [f"<lora:{name}:{weight:g}>" for name, weight in loras.items() if name.lower() not in mentioned]
    return " ".join(part for part in [prompt, *extra] if part)


def infotext_for(request: GenerationRequest, seed: int, size: tuple[int, int], model_info: ModelStamp) -> str:
    """A1111 ``parameters`` text for one image: its own seed and size, the model that made it."""
    img2img = request.mode != "txt2img"
    extra = {"Mask blur": request.mask_blur} if request.mask is not None else {}
    return GenerationParams(
        prompt=_prompt_with_loras(request.prompt, model_info.loras), negative_prompt=request.negative_prompt,
        steps=request.steps, sampler=_canonical_sampler(request.sampler), cfg_scale=request.cfg_scale,
        seed=seed, width=size[0], height=size[1],
        model_hash=model_info.hash, model_name=model_info.name,
        vae_hash=model_info.vae_hash, vae_name=model_info.vae_name,
        denoising_strength=request.strength if img2img else None, clip_skip=request.clip_skip,
        lora_hashes=dict(model_info.lora_hashes), extra=extra, version=f"mlsd {__version__}",
    ).to_infotext()  # fmt: skip


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) as A1111's ``image_grid`` with default settings: rows = round(sqrt(n))."""
    rows = min(max(1, round(math.sqrt(n))), n)
    return rows, math.ceil(n / rows)


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    rows, cols = grid_shape(len(images))
    w, h = max(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (i % cols * w, i // cols * h))
    return grid


def next_sequence_number(folder: Path, basename: str = "") -> int:
    """A1111's ``get_next_sequence_number``: one past the highest numeric prefix in the folder."""
    prefix = f"{basename}-" if basename else ""
    highest = -1
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(prefix):
            try:
                highest = max(highest, int(os.path.splitext(name[len(prefix) :])[0].split("-")[0]))
            except ValueError:
                pass
    return highest + 1


def _format_of(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"Cannot tell the image format from '{path.name}'.", where=path,
                         fix="end the file name in .png, .jpg or .webp")  # fmt: skip
    return fmt


def _write_temp(image: Image.Image, final: Path, text: str) -> Path:
    """Encode into ``.name.tmp-XXXX`` beside ``final`` and sync it; the caller moves it into place."""
    fmt = _format_of(final)
    while True:
        tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
        try:
            # os.open rather than mkstemp: mkstemp's 0600 would carry over to the published image.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "PNG":
                image.save(f, format=fmt, pnginfo=png_pnginfo(text))
            else:
                image.convert("RGB").save(f, format=fmt, exif=exif_with_parameters(text), quality=95)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _publish_new(tmp: Path, final: Path) -> bool:
    """Give ``tmp`` the name ``final`` only if nothing holds it yet; False if something does."""
    try:
        os.link(tmp, final)  # atomic and exclusive: fails if another writer took the name meanwhile
        return True
    except FileExistsError:
        return False
    except OSError:
        # Filesystems without hard links (FAT, some network shares): check, then move; a small race.
        if os.path.lexists(final):
            return False
        os.replace(tmp, final)
        return True


def _sync_dir(folder: Path) -> None:
    # Makes the new name survive a power cut too; best effort (Windows cannot open folders).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_numbered(
    image: Image.Image, folder: Path, text: str, *, basename: str = "", decoration: str = ""
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    start = next_sequence_number(folder, basename)

    def name(n: int) -> Path:
        number = f"{basename}-{n:04}" if basename else f"{n:05}"
        return folder / f"{number}{'-' + decoration if decoration else ''}.png"

    tmp = _write_temp(image, name(start), text)
    try:
        for n in range(start, start + _MAX_TRIES):
            if _publish_new(tmp, name(n)):
                _sync_dir(folder)
                return name(n)
    finally:
        tmp.unlink(missing_ok=True)
    raise UsageError(f"No free file number in {folder} after {_MAX_TRIES} tries.", where=folder,
                     fix="another program is writing there; save somewhere else")  # fmt: skip


def output_paths(output: Path, count: int) -> list[Path]:
    """``--output`` targets: the file itself for one image, ``stem-1.png, stem-2.png...`` for more."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]


def check_targets(output: str | os.PathLike | None, count: int, *, overwrite: bool = False) -> list[Path]:
    """The ``--output`` files for ``count`` images, or a UsageError if any is taken or unusable.

    Cheap: callers run it before generating, so a refusal does not come after minutes of work.
    No output (numbered files in the outputs folder) has nothing to check and gives [].
    """
    if output is None:
        return []
    targets = output_paths(Path(output), count)
    for target in targets:
        _format_of(target)
        if target.is_dir():
            raise UsageError("The output path is a folder.", where=target,
                             fix="give a file name such as out.png")  # fmt: skip
        if os.path.lexists(target) and not overwrite:
            raise UsageError("The output file already exists.", where=target, fix=_OVERWRITE_FIX)
    return targets


def _save_to_output(
    images: Sequence[Image.Image], texts: Sequence[str], output: Path, overwrite: bool
) -> list[Path]:
    # every check before any write: a refusal leaves nothing behind
    targets = check_targets(output, len(images), overwrite=overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for image, text, target in zip(images, texts, targets, strict=True):
            tmp = _write_temp(image, target, text)
            try:
                if overwrite:
                    os.replace(tmp, target)
                elif not _publish_new(tmp, target):
                    raise UsageError("The output file appeared meanwhile.", where=target, fix=_OVERWRITE_FIX)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(target)
    except BaseException:
        if not overwrite:  # files this call created are removed; replaced ones cannot be restored
            for path in written:
                path.unlink(missing_ok=True)
        raise
    _sync_dir(output.parent)
    return targets


def save_result(
    result: GenerationResult,
    stamp: ModelStamp,
    *,
    outputs_root: Path = Path("outputs"),
    output: Path | None = None,
    overwrite: bool = False,
    grid: bool = True,
    now: datetime | None = None,
) -> SavedImages:
    """Write every image (and a grid for batches) with its A1111 ``parameters`` text.

    With ``output`` the images go exactly there (no grid, no dated folders); otherwise into
    ``outputs_root`` in A1111's layout. img2img, inpaint and outpaint all count as img2img there.
    """
    images = result.images
    texts = [infotext_for(result.request, seed, im.size, stamp)
             for im, seed in zip(images, result.seeds, strict=True)]  # fmt: skip
    if output is not None:
        return SavedImages(_save_to_output(images, texts, Path(output), overwrite), None, texts)
    day = (now or datetime.now()).strftime("%Y-%m-%d")
    kind = "txt2img" if result.request.mode == "txt2img" else "img2img"
    root = Path(outputs_root)
    paths = [_save_numbered(im, root / f"{kind}-images" / day, text, decoration=str(seed))
             for im, seed, text in zip(images, result.seeds, texts, strict=True)]  # fmt: skip
    grid_path = None
    if grid and len(images) > 1:
        # A1111 puts the first image's text on the grid
        grid_dir = root / f"{kind}-grids" / day
        grid_path = _save_numbered(image_grid(images), grid_dir, texts[0], basename="grid")
    return SavedImages(paths, grid_path, texts)
