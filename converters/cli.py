"""`mlsd convert`: the converter's command line (registered by mlsd.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlsd.errors import UsageError


def add_parser(sub, common) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (+ LoRAs) into a Core ML bundle")
    p.add_argument("model", help="checkpoint path or name in models/Stable-diffusion")
    p.add_argument("-o", "--output", type=Path, help="bundle folder (default: <models-dir>/Core-ML/<name>)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH|NAME[:WEIGHT]",
                   help="merge a LoRA into the weights (repeatable)")
    p.add_argument("--vae", help="VAE file to bake in")
    p.add_argument("--attention", default="split_einsum", choices=["split_einsum", "split_einsum_v2", "original"],
                   help="split_einsum for the Neural Engine (default), original for the GPU")
    p.add_argument("--chunks", type=int, default=2, help="UNet chunks (1 = a single Unet.mlpackage)")
    p.add_argument("--quantize-bits", default="none", choices=["none", "8", "6", "4"])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--sizes", help="several sizes in one multifunction UNet, e.g. 512x512,512x768")
    p.add_argument("--components", default="text_encoder,unet,vae_decoder,vae_encoder")
    p.add_argument("--min-target", default="macOS14")
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--prompt-chunks", type=int, default=1,
                   help="prompts up to N x 75 tokens on Core ML (one UNet function each; needs macOS15)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    p.add_argument("--ema", action="store_true")
    p.add_argument("--resources", action="store_true", help="also compile Resources/*.mlmodelc (macOS only)")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check of every package")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    common(p)
    p.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="prove a bundle's packages against the PyTorch source (any OS)")
    v.add_argument("bundle", help="bundle folder or name in models/Core-ML; also a folder or package converted "
                   "elsewhere (with --against)")
    v.add_argument("--against", help="source checkpoint (default: the one recorded in mlsd.json)")
    v.add_argument("--json", action="store_true")
    common(v)
    v.set_defaults(func=cmd_verify)


def print_checks(checks) -> bool:
    from converters.coreml.verify import GATE_DB

    for c in checks:
        status = "ok" if c.passed else "FAIL"
        note = "" if c.gated else "  (palettized: quality loss vs full precision, not gated)"
        print(f"  {c.component:<13} {c.output:<18} PSNR {c.psnr:6.1f} dB  max abs {c.max_abs:.2e}  {status}{note}")
    failed = [c for c in checks if not c.passed]
    print(f"verification: {len(checks) - len(failed)}/{len(checks)} outputs at or above {GATE_DB:.0f} dB")
    return not failed


def cmd_verify(args) -> int:
    quiet_coremltools()
    from converters.coreml.verify import verify_bundle
    from mlsd.paths import models_dir

    root = models_dir(args.models_dir)
    bundle = root.resolve(args.bundle, "coreml")
    against = root.resolve(args.against, "checkpoint") if args.against else None
    if (bundle / "mlsd.json").is_file():
        checks = verify_bundle(bundle, against)
    else:  # converted elsewhere (Apple's folders, HF repos, Resources folders, one package)
        from converters.coreml.verify_foreign import verify_foreign

        checks = verify_foreign(bundle, against)
    if args.json:
        print(json.dumps([c.__dict__ | {"passed": bool(c.passed)} for c in checks], indent=2, default=float))
        return 0 if all(c.passed for c in checks) else 1
    print(bundle)
    return 0 if print_checks(checks) else 1


def parse_sizes(text: str | None, width: int, height: int) -> list[tuple[int, int]]:
    if not text:
        return [(width, height)]
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.lower().strip().split("x"))
        except ValueError:
            raise UsageError(f"Size '{part}' is not WIDTHxHEIGHT.", where="--sizes", fix="e.g. 512x512,512x768") from None
        sizes.append((w, h))
    return sizes


def quiet_coremltools() -> None:
    """coremltools reports untested versions, missing macOS-only proxies and per-pass progress bars;
    none of it is actionable for a user, and it buries mlsd's own stage lines."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="coremltools")


def cmd_convert(args) -> int:
    quiet_coremltools()
    from converters.coreml.convert import ConvertOptions, convert_checkpoint, default_bundle_path
    from mlsd.paths import models_dir
    from mlsd.session import resolve_loras

    options = ConvertOptions(
        attention=args.attention, chunks=args.chunks,
        quantize_bits=None if args.quantize_bits == "none" else int(args.quantize_bits),
        sizes=parse_sizes(args.sizes, args.width, args.height),
        components=tuple(c.strip() for c in args.components.split(",") if c.strip()),
        min_target=args.min_target, clip_skip=args.clip_skip, resources=args.resources,
        prompt_chunks=args.prompt_chunks,
    )
    options.validate()
    root = models_dir(args.models_dir)
    checkpoint = root.resolve(args.model, "checkpoint")
    loras = resolve_loras(root, args.lora)
    vae = root.resolve(args.vae, "vae") if args.vae else None
    bundle = args.output or default_bundle_path(root.root, checkpoint, [c.path for c in loras], options)

    def stage(component: str, status: str, seconds: float) -> None:
        if status == "start":
            print(f"[convert] {component}: converting...", file=sys.stderr, flush=True)
        elif status == "reused":
            print(f"[convert] {component}: unchanged, reused from the existing bundle", file=sys.stderr)
        else:
            print(f"[convert] {component}: done in {seconds:.1f} s", file=sys.stderr)

    path = convert_checkpoint(checkpoint, bundle, options=options, loras=loras, vae=vae,
                              prediction_type=args.prediction_type, ema=args.ema, on_stage=stage)
    ok = True
    if not args.no_verify:
        from converters.coreml.verify import verify_bundle

        print("[convert] verifying every package against the PyTorch source...", file=sys.stderr)
        ok = print_checks(verify_bundle(path))
    manifest = json.loads((path / "mlsd.json").read_text())
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(path)
    return 0 if ok else 1
