"""`mlsd demo`: the main job end to end on a built-in model, offline, in seconds."""

from __future__ import annotations

import time
from pathlib import Path

DEMO_NAME = "mlsd-demo-tiny"


def ensure_demo_model(models_root: Path) -> Path:
    """Write the tiny seeded demo checkpoint (A1111 layout + sidecar yaml) unless it is already there."""
    from mlsd.demo.tiny import write_checkpoint

    path = models_root / "Stable-diffusion" / f"{DEMO_NAME}.safetensors"
    if not (path.is_file() and path.with_suffix(".yaml").is_file()):
        tmp = path.with_name(f".{path.name}.partial.safetensors")
        write_checkpoint(tmp, "sd1", seed=0)
        tmp.with_suffix(".yaml").replace(path.with_suffix(".yaml"))
        tmp.replace(path)  # the checkpoint last: a present .safetensors means a complete pair
    return path


def cmd_demo(args) -> int:
    from mlsd.outputs import ModelStamp, save_result
    from mlsd.paths import models_dir
    from mlsd.pipeline.generate import run
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
    request = GenerationRequest(prompt="a red circle on a blue background", negative_prompt="blurry",
                                steps=20, cfg_scale=7.0, seed=args.seed, sampler="DPM++ 2M Karras",
                                width=256, height=256)
    result = run(backend, request)
    saved = save_result(result, ModelStamp.from_paths(path), outputs_root=args.output_dir)
    print(f"image: {saved.paths[0]}")
    print(f"generated {request.width}x{request.height}, {request.steps} steps, seed {result.seeds[0]}, "
          f"in {result.seconds:.2f} s on {backend.device} ({backend.precision})")
    if not args.no_coreml:
        _coreml_leg(root, path, request, saved.paths[0], args)
    print("note: the demo model has random weights (it draws noise); it proves the whole path runs offline.")
    return 0


def _coreml_leg(root, checkpoint: Path, request, torch_image: Path, args) -> None:
    """Convert the demo model, verify every package, and draw the same seed through the Core ML path."""
    import sys

    from converters.cli import print_checks, quiet_coremltools

    quiet_coremltools()
    from converters.coreml.convert import ConvertOptions, convert_checkpoint, default_bundle_path
    from converters.coreml.verify import verify_bundle
    from mlsd.backends.coreml_backend import CoreMLBackend
    from mlsd.outputs import ModelStamp, save_result
    from mlsd.pipeline.generate import run

    options = ConvertOptions(sizes=[(request.width, request.height)], chunks=2)
    bundle = default_bundle_path(root.root, checkpoint, [], options)
    t0 = time.perf_counter()
    convert_checkpoint(checkpoint, bundle, options=options,
                       on_stage=lambda c, s, t: print(f"[convert] {c}: {s}" + (f" {t:.1f} s" if t else ""),
                                                      file=sys.stderr))
    print(f"bundle: {bundle} ({time.perf_counter() - t0:.1f} s)")
    print_checks(verify_bundle(bundle))
    runner = "coreml" if sys.platform == "darwin" else "reference"
    backend = CoreMLBackend(bundle, runner=runner)
    request.seed = args.seed
    result = run(backend, request)
    saved = save_result(result, ModelStamp.from_paths(checkpoint), outputs_root=args.output_dir)
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(torch_image).convert("RGB"), np.float64)
    b = np.asarray(Image.open(saved.paths[0]).convert("RGB"), np.float64)
    mse = float(((a - b) ** 2).mean())
    db = 100.0 if mse == 0 else 10 * np.log10(255**2 / mse)
    print(f"image ({backend.name}): {saved.paths[0]} in {result.seconds:.2f} s")
    print(f"PSNR between the PyTorch and the Core ML image: {db:.1f} dB (per-package figures above; a random-"
          f"weight model amplifies Core ML's fp16 rounding over {request.steps} steps, so whole images drift apart)")


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", help="build the tiny built-in model and generate one image with it")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    p.add_argument("--no-coreml", action="store_true", help="skip converting and the Core ML leg")
    common(p)
    p.set_defaults(func=cmd_demo)
