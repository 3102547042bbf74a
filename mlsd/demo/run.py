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
    print("note: the demo model has random weights (it draws noise); it proves the whole path runs offline.")
    return 0


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", help="build the tiny built-in model and generate one image with it")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    common(p)
    p.set_defaults(func=cmd_demo)
