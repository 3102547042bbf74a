"""`mlsd generate` and `mlsd samplers`: the command-line face of the generation pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlsd.errors import InputFileError, UsageError

# Request fields a user may set; None means "not given" so --from-image can fill it.
DEFAULTS = {"negative_prompt": "", "steps": 20, "cfg_scale": 7.0, "seed": -1, "sampler": None,
            "width": 512, "height": 512, "clip_skip": 1, "strength": 0.75}


def add_parsers(sub, common) -> None:
    p = sub.add_parser("generate", help="make images (PyTorch fallback; Core ML bundles once converted)")
    p.add_argument("--model", "-m", help="checkpoint path or name in models/Stable-diffusion")
    p.add_argument("--prompt", "-p")
    p.add_argument("--negative-prompt", "-n")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--seed", type=int, help="-1 = random (printed)")
    p.add_argument("--sampler", help="A1111 name, e.g. 'DPM++ 2M Karras' (see `mlsd samplers`)")
    p.add_argument("--schedule-type", help="A1111 >= 1.9 split form, e.g. Karras")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch-count", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--init-image", type=Path, help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, help="img2img denoising strength 0-1 (default 0.75)")
    p.add_argument("--resize-mode", default="just-resize", choices=["just-resize", "crop-and-resize",
                                                                     "resize-and-fill"])
    p.add_argument("--mask", type=Path, help="inpainting mask, white = repaint")
    p.add_argument("--mask-blur", type=int, default=4)
    p.add_argument("--outpaint", help="LEFT,RIGHT,UP,DOWN pixels to add around --init-image")
    p.add_argument("--lora", action="append", default=[], metavar="PATH|NAME[:WEIGHT]",
                   help="merge a LoRA (repeatable); NAME:TE_W:UNET_W sets the two weights apart")
    p.add_argument("--vae", help="VAE file path or name in models/VAE")
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    p.add_argument("--family", choices=["sd1", "sd2"],
                   help="Core ML models converted elsewhere: the family, where the text width does not tell")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "coreml", "coreml-reference"],
                   help="auto: Core ML for bundles on macOS, else PyTorch (CUDA > MPS > CPU)")
    p.add_argument("--compute-unit", default="auto", choices=["auto", "ane", "gpu", "cpu", "all"],
                   help="Core ML: auto = Neural Engine for split_einsum bundles, GPU for original")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--compile", action="store_true",
                   help="torch backend: torch.compile the UNet (CPU: ~1.4x faster fp32 steps after a first "
                        "call that compiles for about a minute; worth it for many images)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", type=Path, help="write exactly this file (several images: FILE-N)")
    out.add_argument("--output-dir", type=Path, default=Path("outputs"), help="outputs root (A1111 layout)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --output file")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--from-image", type=Path, help="reuse the parameters stored in an image")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    common(p)
    p.set_defaults(func=cmd_generate)

    s = sub.add_parser("samplers", help="list the sampler names mlsd understands")
    s.add_argument("--json", action="store_true")
    common(s)
    s.set_defaults(func=cmd_samplers)


def cmd_samplers(args) -> int:
    from mlsd.pipeline.samplers import DEFAULT_SAMPLER, SAMPLERS

    if args.json:
        print(json.dumps({n: s.scheduler for n, s in SAMPLERS.items()}, indent=2))
        return 0
    for name, s in SAMPLERS.items():
        print(f"{name:<22} {s.scheduler}{'  (default)' if name == DEFAULT_SAMPLER else ''}")
    return 0


def _from_image(path: Path) -> dict:
    from mlsd.infotext import GenerationParams, read_image_parameters

    info = read_image_parameters(path)
    if info.source != "a1111" or not info.raw:
        raise InputFileError("The image holds no A1111-style generation parameters.", where=path,
                             fix="pick a PNG made by mlsd or A1111 (see `mlsd info IMAGE`)")
    p = GenerationParams.from_infotext(info.raw)
    return {k: v for k, v in {
        "prompt": p.prompt, "negative_prompt": p.negative_prompt, "steps": p.steps, "sampler": p.sampler,
        "cfg_scale": p.cfg_scale, "seed": p.seed, "width": p.width, "height": p.height,
        "clip_skip": p.clip_skip, "strength": p.denoising_strength, "model": p.model_name,
    }.items() if v not in (None, "")}


def build_request(args):
    from mlsd.pipeline.request import GenerationRequest
    from mlsd.pipeline.samplers import DEFAULT_SAMPLER, resolve_sampler
    from mlsd.prompts import extract_lora_tags

    reused = _from_image(args.from_image) if args.from_image else {}
    values = {}
    for key, default in DEFAULTS.items() | {"prompt": None}.items():
        given = getattr(args, key, None)
        values[key] = given if given is not None else reused.get(key, default)
    if values["prompt"] is None:
        raise UsageError("No prompt given.", where="--prompt",
                         fix='pass --prompt "..." or --from-image IMAGE')
    try:
        sampler = resolve_sampler(values["sampler"] or DEFAULT_SAMPLER, args.schedule_type)
    except UsageError as e:  # name the option, as every other invalid value does
        raise UsageError(e.what, where="--sampler/--schedule-type" if args.schedule_type else "--sampler",
                         fix=e.fix) from None
    # The tags only pick LoRAs here: the prompts keep them (tokenizing drops them), so the saved
    # parameters hold the prompt as written, as A1111's do.
    _, tags = extract_lora_tags(values["prompt"])
    _, neg_tags = extract_lora_tags(values["negative_prompt"])
    request = GenerationRequest(
        prompt=values["prompt"], negative_prompt=values["negative_prompt"], steps=values["steps"],
        cfg_scale=values["cfg_scale"], seed=values["seed"], sampler=sampler.name, width=values["width"],
        height=values["height"], batch_size=args.batch_size, batch_count=args.batch_count,
        clip_skip=values["clip_skip"], strength=values["strength"], resize_mode=args.resize_mode,
        mask_blur=args.mask_blur, init_image=_open_image(args.init_image, "--init-image"),
        mask=_open_image(args.mask, "--mask"), outpaint=_outpaint(args.outpaint),
    )
    request.validate()
    if request.mask is not None and request.init_image is not None and request.outpaint is None:
        if request.mask.size != request.init_image.size:
            raise UsageError(f"Mask size {request.mask.size} differs from the init image size "
                             f"{request.init_image.size}.", where=args.mask,
                             fix="use a mask of the same size")
    return request, [*tags, *neg_tags], reused.get("model")


def _open_image(path: Path | None, option: str):
    from mlsd.pipeline.images import open_image

    return None if path is None else open_image(path, "image", option)


def _outpaint(text: str | None):
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UsageError(f"--outpaint '{text}' needs four integers.", where="--outpaint",
                         fix="e.g. 64,64,0,0")
    return values


def resolve_model(root, name: str) -> Path:
    """A checkpoint (or diffusers folder) by name or path, else a Core ML bundle in models/Core-ML."""
    from mlsd.errors import ModelNotFoundError

    try:
        return root.resolve(name, "checkpoint")
    except ModelNotFoundError:
        try:
            return root.resolve(name, "coreml")
        except ModelNotFoundError:
            pass
        raise


def model_stamp(model_path: Path, vae_path, loras):
    """Infotext identity: a bundle reports the checkpoint it was converted from (A1111 hash and LoRAs)."""
    from mlsd.backends.coreml_backend import is_bundle
    from mlsd.outputs import ModelStamp

    if not is_bundle(model_path):
        return ModelStamp.from_paths(model_path, vae_path, [(c.path, c.unet_weight) for c in loras])
    manifest = json.loads((model_path / "mlsd.json").read_text())
    loras = manifest.get("loras", [])
    return ModelStamp(Path(manifest["source"]["path"]).stem, manifest["source"].get("a1111_hash"),
                      loras={Path(x["path"]).stem: x["unet_weight"] for x in loras},
                      lora_hashes={Path(x["path"]).stem: x["hash"] for x in loras})


def cmd_generate(args) -> int:
    from mlsd.outputs import check_targets, save_result
    from mlsd.paths import models_dir
    from mlsd.pipeline.generate import generate
    from mlsd.pipeline.request import GenerationResult
    from mlsd.progress import StepBar
    from mlsd.session import ModelKey, choose_backend, load_backend, resolve_loras

    request, tags, reused_model = build_request(args)
    root = models_dir(args.models_dir)
    model_name = args.model or reused_model
    if not model_name:
        raise UsageError("No model given.", where="--model", fix="pass --model NAME|PATH (see `mlsd models`)")
    model_path = resolve_model(root, model_name)
    vae_path = root.resolve(args.vae, "vae") if args.vae else None
    loras = resolve_loras(root, args.lora, tags)
    n_images = request.batch_size * request.batch_count
    check_targets(args.output, n_images, overwrite=args.overwrite)  # refuse before minutes of work
    key = ModelKey(model_path, vae_path, tuple(loras), args.prediction_type, args.ema, args.device,
                   args.precision, args.backend, args.compute_unit, request.output_size, family=args.family,
                   compile=args.compile)
    choice = choose_backend(key)
    kind, _, why = choice
    backend = load_backend(key, choice)
    if not args.json:  # after loading: a refused file's error stays the first thing on stderr
        print(f"backend: {kind} ({why})", file=sys.stderr)
    bar = StepBar()
    result = None
    for event in generate(backend, request):
        if isinstance(event, GenerationResult):
            result = event
        else:
            label = f"batch {event.batch + 1}/{event.batch_count}" if event.batch_count > 1 else "sampling"
            bar.update(label, event.step, event.total, event.elapsed)
    bar.close()
    stamp = model_stamp(model_path, vae_path, loras)
    saved = save_result(result, stamp, outputs_root=args.output_dir, output=args.output,
                        overwrite=args.overwrite, grid=not args.no_grid)
    summary = {"images": [str(p) for p in saved.paths], "grid": str(saved.grid) if saved.grid else None,
               "seeds": result.seeds, "seconds": round(result.seconds, 3),
               "timings": {k: round(v, 3) for k, v in result.timings.items()},
               "device": f"{backend.device} ({backend.device_reason})", "precision": backend.precision}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        if args.seed is None or args.seed < 0:
            print(f"seed: {result.seeds[0]}", file=sys.stderr)
        for path in saved.paths:
            print(path)
        print(f"{len(saved.paths)} image(s) in {result.seconds:.1f} s on {backend.device} "
              f"({backend.precision})", file=sys.stderr)
    return 0
