"""The work behind the screens, as plain functions run in Textual thread workers.

Each takes a ``post`` callable (a widget's thread-safe ``post_message``) and turns every outcome,
errors included, into a message, so nothing a user does can raise into the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mlsd.errors import InputFileError, MlsdError, UsageError
from mlsd.paths import ModelsDir
from tui.history import History
from tui.messages import Catalog, Conversion, Generation
from tui.preview import latent_preview
from tui.settings import FormValues

if TYPE_CHECKING:
    from mlsd.pipeline.request import GenerationRequest
    from mlsd.session import ModelKey

log = logging.getLogger(__name__)
Post = Callable[[object], object]


@dataclass
class GenerationJob:
    form: FormValues
    models: ModelsDir
    outputs: Path
    history: History | None = None  # where the form fields a PNG lacks are recorded for "reuse"


@dataclass
class Resolved:
    request: GenerationRequest
    model: Path
    vae: Path | None
    loras: list
    key: ModelKey
    backend: str  # what choose_backend picked, and why (shown when the generation starts)
    why: str


_IMPORT_LOCK = threading.Lock()
_imported = False


def warm_imports() -> None:
    """Import torch, transformers, diffusers and mlsd's pipeline once, one thread at a time.

    transformers' and diffusers' lazy modules fail ("cannot import name ...") when two threads import
    them at once, and the token counter, the model scan and the generation run in different threads:
    each worker calls this before touching them.
    """
    global _imported
    with _IMPORT_LOCK:
        if _imported:
            return
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from diffusers.loaders import single_file_utils  # noqa: F401
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: F401

        import mlsd.backends.coreml_backend  # noqa: F401
        import mlsd.backends.torch_backend  # noqa: F401
        import mlsd.checkpoints.load  # noqa: F401
        import mlsd.describe  # noqa: F401
        import mlsd.outputs  # noqa: F401
        import mlsd.pipeline.generate  # noqa: F401
        import mlsd.session  # noqa: F401
        from mlsd.pipeline.samplers import SAMPLERS

        for sampler in SAMPLERS.values():
            getattr(diffusers, sampler.scheduler)
        _imported = True


def open_image(text: str, label: str):
    """A form field's path -> image; blank means none."""
    if not text.strip():
        return None
    from mlsd.pipeline.images import open_image as read

    return read(text.strip(), label.lower(), label.lower())


def resolve_job(job: GenerationJob) -> Resolved:
    """Everything that can be checked before a model loads: names, files, LoRAs, request values, and which
    backend runs it (a bundle with LoRAs, or a backend the model cannot use, is refused here)."""
    from mlsd.backends.coreml_backend import is_bundle, is_coreml_model
    from mlsd.cli_generate import resolve_model
    from mlsd.pipeline.request import GenerationRequest
    from mlsd.prompts import extract_lora_tags
    from mlsd.session import ModelKey, choose_backend, resolve_loras

    form, root = job.form, job.models
    if not form.model:
        raise UsageError("No model selected.", where="Model",
                         fix=f"put a checkpoint in {root.folder('checkpoint')} or start with --model PATH")
    model = resolve_model(root, form.model)
    foreign = model.is_dir() and not is_bundle(model) and is_coreml_model(model)  # converted elsewhere
    if model.is_dir() and not is_coreml_model(model) and not (model / "model_index.json").is_file():
        raise InputFileError("No Core ML model here (no mlsd.json, no .mlpackage or .mlmodelc parts), nor a "
                             "diffusers folder.", where=model,
                             fix="convert a checkpoint to a bundle (F5), pick a checkpoint, or put a whole Core ML "
                                 "folder (Apple's converted folder or a Resources folder) there")
    vae = root.resolve(form.vae, "vae") if form.vae else None
    prompt, tags = extract_lora_tags(form.prompt)
    negative, negative_tags = extract_lora_tags(form.negative_prompt)
    options = [item.strip() for item in form.loras.split(",") if item.strip()]
    loras = resolve_loras(root, options, [*tags, *negative_tags])
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative, steps=form.steps, cfg_scale=form.cfg_scale, seed=form.seed,
        sampler=form.sampler, width=form.width, height=form.height, batch_count=form.batch_count,
        batch_size=form.batch_size, strength=form.strength, clip_skip=form.clip_skip,
        init_image=open_image(form.init_image, "Init image"), mask=open_image(form.mask, "Mask"),
    )
    request.validate()
    if request.mask is not None and request.init_image is not None and request.mask.size != request.init_image.size:
        raise UsageError(f"Mask size {request.mask.size} differs from the init image size "
                         f"{request.init_image.size}.", where=form.mask, fix="use a mask of the same size")
    key = ModelKey(model, vae, tuple(loras), device=form.device, backend=form.backend or "auto",
                   compute_unit=form.compute_unit or "auto", size=request.output_size,
                   family=(form.family or None) if foreign else None)  # the others name their own family
    backend, _, why = choose_backend(key)
    return Resolved(request, model, vae, loras, key, backend, why)


def run_generation(job: GenerationJob, cache, post: Post, cancel: threading.Event,
                   stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Resolve, load (through the cache), sample with a preview per step, save as `mlsd generate` does."""
    from mlsd.cli_generate import model_stamp
    from mlsd.outputs import save_result
    from mlsd.pipeline.generate import generate
    from mlsd.pipeline.loop import Cancelled
    from mlsd.pipeline.request import Progress

    step, total = 0, job.form.steps
    try:
        warm_imports()
        resolved = resolve_job(job)
        request = resolved.request
        post(Generation.Started(resolved.backend, resolved.why, resolved.model))
        backend = cache.backend(resolved.key)
        result = None
        for event in generate(backend, request, cancel):
            if stop_requested():
                cancel.set()  # the worker was cancelled (app closing, a newer job): stop within a step
            if isinstance(event, Progress):
                step, total = event.step, event.total
                post(Generation.Preview(event.step, event.total, latent_preview(event.latents, request.output_size),
                                        event.batch, event.batch_count, event.it_per_s))
            else:
                result = event
        stamp = model_stamp(resolved.model, resolved.vae, resolved.loras)  # a bundle names its source checkpoint
        saved = save_result(result, stamp, outputs_root=job.outputs)
        _record(job, resolved, saved)
        shown = result.images[0] if len(result.images) == 1 or saved.grid is None else None
        if shown is None:
            from PIL import Image

            with Image.open(saved.grid) as grid:
                shown = grid.copy()
        post(Generation.Finished(saved.paths, result.seconds, list(result.seeds), shown, saved.grid))
    except Cancelled:
        post(Generation.Cancelled(step, total))
    except Exception as e:  # noqa: BLE001 - a bad file or a bug must reach the user as a message, not end the app
        if not isinstance(e, MlsdError):
            log.exception("generation failed")
        post(Generation.Failed(e))


def _record(job: GenerationJob, resolved: Resolved, saved) -> None:
    if job.history is None:
        return
    images = list(zip(saved.paths, saved.infotexts, strict=False))
    if saved.grid is not None and saved.infotexts:
        images.append((saved.grid, saved.infotexts[0]))
    form = replace(job.form, model=str(resolved.model))
    try:
        job.history.record(images, form, ran_on=resolved.backend)
    except OSError:  # the images are saved; only "reuse" of backend and compute unit is lost
        log.warning("could not record %s", job.history.path, exc_info=True)


def hash_models(items: list[tuple[Path, str]], post: Post, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """A1111 short hashes of (path, kind) items, one at a time; mlsd.hashes caches them, so a second visit
    is instant. LoRAs get the hash A1111 writes into "Lora hashes", the rest the "Model hash"."""
    from mlsd.hashes import lora_short_hash, model_short_hash

    for path, kind in items:
        if stop_requested():
            return
        try:
            if path.is_dir():
                post(Catalog.Hashed(path, "", None))  # a diffusers folder has no single file to hash
                continue
            short = lora_short_hash(path) if kind == "lora" else model_short_hash(path)
            post(Catalog.Hashed(path, short))
        except Exception as e:  # noqa: BLE001 - an unreadable file gets a note in its row, the rest go on
            post(Catalog.Hashed(path, None, getattr(e, "what", str(e))))


@dataclass
class ConversionJob:
    checkpoint: Path
    bundle: Path
    options: object  # converters.coreml.convert.ConvertOptions (the converter is imported lazily)
    loras: list = field(default_factory=list)  # mlsd.session.LoraChoice, merged into the weights
    vae: Path | None = None
    verify: bool = True


class ConversionCancelled(Exception):
    """Raised from the converter's stage callback: the writer removes its work folder on the way out."""


def run_conversion(job: ConversionJob, post: Post, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Load, convert stage by stage, publish, then verify every package with the reference executor, as
    `mlsd convert` does; a cancel is honoured at the next stage boundary and publishes nothing."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    stage = "load"
    try:
        warm_imports()
        from converters.cli import quiet_coremltools

        quiet_coremltools()
        from converters.coreml.convert import convert_checkpoint

        post(Conversion.Stage("load", "start", 0.0))

        def on_stage(component: str, state: str, seconds: float) -> None:
            nonlocal stage
            if stage == "load":  # the converter reports nothing until the checkpoint is loaded
                timings["load"] = time.perf_counter() - t0
                post(Conversion.Stage("load", "done", timings["load"]))
            if state == "done":
                timings[component] = seconds
            stage = component
            post(Conversion.Stage(component, state, seconds))
            if cancelled():
                raise ConversionCancelled

        bundle = Path(convert_checkpoint(job.checkpoint, job.bundle, options=job.options, loras=job.loras,
                                         vae=job.vae, on_stage=on_stage))
        checks = None
        if job.verify:
            if cancelled():
                post(Conversion.Cancelled("verify", bundle))
                return
            from converters.coreml.verify import verify_bundle

            stage = "verify"
            post(Conversion.Stage("verify", "start", 0.0))
            start = time.perf_counter()
            checks = verify_bundle(bundle)
            timings["verify"] = time.perf_counter() - start
            post(Conversion.Stage("verify", "done", timings["verify"]))
        post(Conversion.Done(bundle, time.perf_counter() - t0, checks, timings))
    except ConversionCancelled:
        post(Conversion.Cancelled(stage))
    except Exception as e:  # noqa: BLE001 - see run_generation
        if not isinstance(e, MlsdError):
            log.exception("conversion failed")
        post(Conversion.Failed(e))
