"""`make bench`: every comparison side by side in one run; a table on stdout and docs/benchmarks.md.

    python -m bench.run [--only generation,conversion,quantized,executor] [--cache DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
PARTS = ("generation", "conversion", "quantized", "executor")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench-cache",
                        help="where the full-size random checkpoint (2.1 GB) and bundles go")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")

    from bench.full_model import write_sd15
    from converters.cli import quiet_coremltools

    quiet_coremltools()  # its import-time chatter is not a result

    t0 = time.perf_counter()
    checkpoint = write_sd15(args.cache / "sd15-random-fp16.safetensors")
    print(f"full-size SD1.5-shaped checkpoint: {checkpoint} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results: dict = {"machine": _machine(), "date": time.strftime("%Y-%m-%d")}
    previous = args.cache / "results.json"
    if set(parts) != set(PARTS) and previous.is_file():
        # A partial run refreshes its parts and keeps the others' figures (same cache, same machine).
        old = json.loads(previous.read_text())
        # The clock is read from /proc/cpuinfo and drifts between runs; the rest names the machine.
        same = {k: v for k, v in old.get("machine", {}).items() if k != "clock_ghz"} == \
            {k: v for k, v in results["machine"].items() if k != "clock_ghz"}
        if same:
            results |= {k: v for k, v in old.items() if k in PARTS and k not in parts}
    bundle = args.cache / "bundle-fp16"
    if "conversion" in parts:
        from bench.conversion import run_in_subprocess

        print("converting (fp16, 2 chunks, all four components)...", flush=True)
        results["conversion"] = run_in_subprocess(checkpoint, bundle)
        _save(args.cache, results)
    if "quantized" in parts:
        from bench.conversion import run_in_subprocess

        print("converting the UNet 6-bit palettized...", flush=True)
        results["quantized"] = run_in_subprocess(checkpoint, args.cache / "bundle-q6", 6, ("unet",))
        _save(args.cache, results)
    if "executor" in parts:
        from bench.executor import bench_executor

        if not (bundle / "mlsd.json").is_file():
            from bench.conversion import run_in_subprocess

            run_in_subprocess(checkpoint, bundle, None, ("unet",))
        print("reference executor vs PyTorch forward (UNet)...", flush=True)
        results["executor"] = bench_executor(bundle, checkpoint)
        _save(args.cache, results)
    if "generation" in parts:
        from bench.generation import bench_generation

        print("generation: mlsd vs diffusers (and preview overhead, CPU modes)...", flush=True)
        results["generation"] = bench_generation(checkpoint)
    from bench.report import render

    text = render(results)
    print(text)
    _save(args.cache, results)
    if not args.no_write:
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "benchmarks.md").write_text(text, encoding="utf-8")
        print(f"written: {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


def _save(cache: Path, results: dict) -> None:
    """After every part, so a long run that is stopped still leaves what it measured."""
    (cache / "results.json").write_text(json.dumps(results, indent=2, default=float))


def _machine() -> dict:
    import coremltools
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    clock, flags = None, []
    model = Path("/proc/cpuinfo")
    if model.is_file():
        lines = model.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        mhz = [float(line.split(":", 1)[1]) for line in lines if line.startswith("cpu MHz")]
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        flags = sorted(set(flags) & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16"})
        cpu = names[0] if names else cpu
        clock = round(max(mhz) / 1000, 2) if mhz else None
    return {"os": f"{platform.system()} {platform.release()}", "cpu": cpu, "cores": os.cpu_count(), "clock_ghz": clock,
            "cpu_flags": flags,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
            if hasattr(os, "sysconf") else None,
            "python": sys.version.split()[0], "torch": torch.__version__, "coremltools": coremltools.__version__,
            "diffusers": diffusers.__version__}


if __name__ == "__main__":
    sys.exit(main())
