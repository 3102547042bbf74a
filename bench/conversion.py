"""Conversion of a full-size checkpoint, one run per process so each peak RSS is its own.

`python -m bench.conversion CKPT BUNDLE [--quantize-bits 6] [--components unet]` prints one JSON line:
per-stage wall seconds and peak RSS, the process peak, package sizes and the chunk byte split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Apple's torch2coreml on a full-size SD1.5 on this machine, one component per run (see docs/benchmarks.md).
APPLE = {"text_encoder": 15.0, "unet": 309.0, "vae_decoder": 90.0, "vae_encoder": 48.0,
         "total": 462.0, "unet_6bit": 443.0, "peak_gb": 8.5, "q6_ratio": 0.375, "chunk_split": [51.6, 48.4]}


def convert_once(checkpoint: Path, bundle: Path, quantize_bits: int | None, components: list[str]) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from bench.measure import RssSampler, peak_rss_bytes
    from converters.cli import quiet_coremltools

    quiet_coremltools()
    from converters.coreml.convert import ConvertOptions, convert_checkpoint

    sampler = RssSampler()
    t0 = time.perf_counter()
    options = ConvertOptions(quantize_bits=quantize_bits, components=tuple(components))

    def on_stage(component: str, event: str, _seconds: float) -> None:
        if event == "start":
            sampler.mark(component)
        elif event == "done":
            sampler.mark(f"after {component}")

    sampler.mark("load")
    convert_checkpoint(checkpoint, bundle, options=options, on_stage=on_stage)
    total = time.perf_counter() - t0
    sampler.stop()
    manifest = json.loads((bundle / "mlsd.json").read_text())
    unet = manifest["components"].get("unet", {})
    stages = {name: {"seconds": round(s, 2), "peak_gb": round(p / 1e9, 3)} for name, s, p in sampler.stages}
    return {
        "quantize_bits": quantize_bits, "total_s": round(total, 2), "peak_gb": round(peak_rss_bytes() / 1e9, 3),
        "stages": stages, "load_s": manifest.get("load_seconds"),
        "package_bytes": {name: sum(f.stat().st_size for f in (bundle / name).rglob("*") if f.is_file())
                          for name in sorted(p.name for p in bundle.glob("*.mlpackage"))},
        "chunk_fractions": unet.get("sizes", [{}])[0].get("chunks", {}).get("fractions"),
        "chunk_bytes": unet.get("sizes", [{}])[0].get("chunks", {}).get("bytes"),
        "quantization": unet.get("sizes", [{}])[0].get("quantization"),
    }


def run_in_subprocess(checkpoint: Path, bundle: Path, quantize_bits: int | None = None,
                      components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder")) -> dict:
    import shutil

    shutil.rmtree(bundle, ignore_errors=True)  # a re-run would reuse components and measure nothing
    cmd = [sys.executable, "-m", "bench.conversion", str(checkpoint), str(bundle),
           "--components", ",".join(components)] + (["--quantize-bits", str(quantize_bits)] if quantize_bits else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--quantize-bits", type=int)
    parser.add_argument("--components", default="text_encoder,unet,vae_decoder,vae_encoder")
    args = parser.parse_args(argv)
    print(json.dumps(convert_once(args.checkpoint, args.bundle, args.quantize_bits, args.components.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
