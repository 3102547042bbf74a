"""`mlsd demo`: the main job end to end on the built-in model, offline, in seconds.

The built-in model is a tiny SD1-architecture model trained by mlsd itself on synthetic shapes
(mlsd/demo/train.py, `make demo-model`); it ships as package data and is installed into the models
directory like any downloaded checkpoint, with its sidecar .yaml and a LoRA that turns every shape green.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import time
from pathlib import Path

DEMO_NAME = "mlsd-demo-shapes"
LORA_NAME = "mlsd-demo-green"
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "demo"
PROMPTS = ("a red circle on a blue background", "a yellow star on a black background",
           "a green triangle on a white background", "a purple square on a gray background")
SIZE = 64  # the model was trained at 64x64 (8x8 latents)


def shipped_files() -> tuple[Path, Path, Path]:
    """(checkpoint, sidecar yaml, LoRA) as installed with the package."""
    from mlsd.errors import InputFileError

    files = (SHIPPED / f"{DEMO_NAME}.safetensors", SHIPPED / f"{DEMO_NAME}.yaml", SHIPPED / f"{LORA_NAME}.safetensors")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputFileError(f"The built-in demo model is missing from the installed package ({missing[0].name}).",
                             where=missing[0].parent, fix="reinstall mlsd (make setup), or retrain it: make demo-model")
    return files


def _install(source: Path, dest: Path) -> None:
    """Copy unless an identical file is there (an older demo model of the same name is replaced)."""
    if dest.is_file() and filecmp.cmp(source, dest, shallow=False):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def ensure_demo_model(models_root: Path) -> Path:
    """Install the trained demo checkpoint (+ sidecar .yaml) and its LoRA into the models directory."""
    checkpoint, sidecar, lora = shipped_files()
    path = models_root / "Stable-diffusion" / checkpoint.name
    _install(sidecar, path.with_suffix(".yaml"))
    _install(lora, models_root / "Lora" / lora.name)
    _install(checkpoint, path)  # the checkpoint last: a present .safetensors means a complete set
    return path


def describe(r) -> str:
    """What the shape classifiers read in a demo image (a shapes.Reading), in the prompt's words."""
    if r.colour is None:
        return f"no shape, a {r.background} background"
    return f"a {r.colour} {r.shape} on a {r.background} background"


def matches(prompt: str, r) -> bool | None:
    """Whether an image's reading (a shapes.Reading) shows what the prompt names: its shape, the shape's
    colour, the background (None: the prompt names none of the demo model's words, nothing to check)."""
    import re

    from mlsd.demo.shapes import ALL_COLOURS, COLOURS, SHAPES

    shape = re.search(rf"(?:(\w+) )?\b({'|'.join(SHAPES)})\b", prompt.lower())
    background = re.search(r"(\w+) background", prompt.lower())
    named = {"shape": shape and shape.group(2),
             "colour": shape and shape.group(1) in COLOURS and shape.group(1),
             "background": background and background.group(1) in ALL_COLOURS and background.group(1)}
    checks = [getattr(r, k) == v for k, v in named.items() if v]
    return all(checks) if checks else None


def _draw_and_check(backend, requests: list, checkpoint: Path, output_dir: Path, label: str) -> list:
    """Draw each request, save it A1111-style, and say whether it reads as its prompt; the saved images."""
    from mlsd.demo.shapes import read_image
    from mlsd.outputs import ModelStamp, save_result
    from mlsd.pipeline.generate import run

    verdicts = {True: "as prompted", False: "NOT as prompted", None: "no shape, colour or background words to check"}
    saved_images, matched, seconds = [], 0, 0.0
    for request in requests:
        result = run(backend, request)
        saved = save_result(result, ModelStamp.from_paths(checkpoint), outputs_root=output_dir)
        saved_images.append(saved.paths[0])
        request.seed = result.seeds[0]  # a random seed (-1), fixed: the next leg draws the same image
        reading = read_image(result.images[0])
        ok = matches(request.prompt, reading)
        matched += bool(ok)
        seconds += result.seconds
        print(f"image{label}: {saved.paths[0]}")
        print(f"  prompt {request.prompt!r}, seed {request.seed}; it reads as {describe(reading)!r}: {verdicts[ok]}")
    print(f"{matched}/{len(requests)} images{label} read as their prompts; {len(requests)} x {SIZE}x{SIZE}, "
          f"{requests[0].steps} steps, in {seconds:.2f} s on {backend.device} ({backend.precision})")
    return saved_images


def cmd_demo(args) -> int:
    from mlsd.paths import models_dir
    from mlsd.pipeline.request import GenerationRequest
    from mlsd.session import ModelKey, load_backend

    if not args.no_coreml:
        from converters.cli import quiet_coremltools

        quiet_coremltools()  # before diffusers imports tqdm: its switch is read at import time
    root = models_dir(args.models_dir)
    t0 = time.perf_counter()
    path = ensure_demo_model(root.root)
    print(f"demo model: {path} ({time.perf_counter() - t0:.1f} s)")
    backend = load_backend(ModelKey(path, device=args.device))
    requests = [GenerationRequest(prompt=prompt, negative_prompt="", steps=20, cfg_scale=7.0, seed=args.seed,
                                  sampler="DPM++ 2M Karras", width=SIZE, height=SIZE)
                for prompt in (args.prompt or PROMPTS)]
    saved_paths = _draw_and_check(backend, requests, path, args.output_dir, "")
    if not args.no_coreml:
        _coreml_leg(root, path, requests, saved_paths, args)
    print(f"try: mlsd generate -m {DEMO_NAME} -p \"a yellow star on a black background\" --width {SIZE} "
          f"--height {SIZE}   (add --lora {LORA_NAME} to turn every shape green)")
    return 0


def _coreml_leg(root, checkpoint: Path, requests: list, torch_images: list[Path], args) -> None:
    """Convert the demo model, verify every package, and draw the same prompts through the Core ML path."""
    import sys

    from converters.cli import print_checks, quiet_coremltools

    quiet_coremltools()
    from converters.coreml.convert import ConvertOptions, convert_checkpoint, default_bundle_path
    from converters.coreml.verify import verify_bundle
    from mlsd.backends.coreml_backend import CoreMLBackend
    from mlsd.pipeline.images import image_psnr

    options = ConvertOptions(sizes=[(SIZE, SIZE)], chunks=2)
    bundle = default_bundle_path(root.root, checkpoint, [], options)
    t0 = time.perf_counter()
    convert_checkpoint(checkpoint, bundle, options=options,
                       on_stage=lambda c, s, t: print(f"[convert] {c}: {s}" + (f" {t:.1f} s" if t else ""),
                                                      file=sys.stderr))
    print(f"bundle: {bundle} ({time.perf_counter() - t0:.1f} s)")
    print_checks(verify_bundle(bundle))
    runner = "coreml" if sys.platform == "darwin" else "reference"
    backend = CoreMLBackend(bundle, runner=runner)
    from PIL import Image

    coreml_images = _draw_and_check(backend, requests, checkpoint, args.output_dir, f" ({backend.name})")
    psnrs = [image_psnr(Image.open(a).convert("RGB"), Image.open(b).convert("RGB"))
             for a, b in zip(torch_images, coreml_images)]
    print(f"PSNR of the Core ML images against the PyTorch ones: {min(psnrs):.1f}-{max(psnrs):.1f} dB (Core ML "
          f"computes in fp16; per-package figures above)")


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", help="install the built-in shapes model and generate a few images with it")
    p.add_argument("--prompt", action="append", help="repeatable; default: four prompts, e.g. 'a yellow star on a "
                   "black background' (shapes: circle, square, triangle, star; colours red, orange, yellow, green, "
                   "cyan, blue, purple, pink; backgrounds white, black, gray, blue, yellow, green)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    p.add_argument("--no-coreml", action="store_true", help="skip converting and the Core ML leg")
    common(p)
    p.set_defaults(func=cmd_demo)
