"""Benchmark results -> the markdown table printed by `make bench` and kept in docs/benchmarks.md."""

from __future__ import annotations

from bench.conversion import APPLE


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _cpu_peak(machine: dict) -> float:
    return (machine.get("cores") or 1) * (machine.get("clock_ghz") or 2.6) * 32


def _bf16_note(machine: dict) -> str:
    flags = set(machine.get("cpu_flags") or [])
    units = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if units:
        return (f"bf16 goes past it because this CPU has bf16 dot-product instructions ({', '.join(units)}), "
                "which do twice the multiply-adds per cycle.")
    return "beyond it lie lower precisions, and this CPU has no bf16 units (AVX-512 bf16, AMX): bf16 is emulated there."


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# mlsd benchmarks", "",
             f"Measured {r['date']} on {m['os']}, {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; "
             f"Python {m['python']}, torch {m['torch']}, coremltools {m['coremltools']}, diffusers {m['diffusers']}.",
             "Model: a full-size SD1.5-shaped checkpoint with random weights (A1111 single file, fp16, 2.1 GB), "
             "built by `bench/full_model.py`, so nothing is downloaded. Regenerate with `make bench`.", ""]
    if "conversion" in r:
        c = r["conversion"]
        st = c["stages"]
        lines += ["## Conversion (text encoder, 2-chunk split_einsum UNet, VAE decoder and encoder, 512x512)", "",
                  "Peer: Apple's `torch2coreml` on the same machine class, one component per run (its figures were "
                  "measured here before this project started; it is not installable offline, so it is not rerun).",
                  "", _row("stage", "mlsd s", "mlsd peak GB", "Apple s", "ratio"), _row(*["---"] * 5)]
        for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
            if name in st:
                lines.append(_row(name, st[name]["seconds"], st[name]["peak_gb"], APPLE[name],
                                  f"{st[name]['seconds'] / APPLE[name]:.2f}x"))
        lines.append(_row("load", st.get("load", {}).get("seconds", "-"), st.get("load", {}).get("peak_gb", "-"),
                          "-", "-"))
        lines.append(_row("**total**", c["total_s"], c["peak_gb"], APPLE["total"],
                          f"{c['total_s'] / APPLE['total']:.2f}x"))
        fr = c.get("chunk_fractions") or []
        lines += ["", "Packages (bytes): " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in c["package_bytes"].items()),
                  f"Chunk split: {' / '.join(f'{100 * f:.1f} %' for f in fr)} (Apple: 51.6 / 48.4 %).", "",
                  "Targets: " + "; ".join([
                      f"time <= 0.5x Apple ({c['total_s'] / APPLE['total']:.2f}x: "
                      f"{_verdict(c['total_s'] <= 0.5 * APPLE['total'])})",
                      f"peak <= 5 GB ({c['peak_gb']:.1f} GB: {_verdict(c['peak_gb'] <= 5)}; Apple 8.5 GB)",
                      f"chunks within 3 % ({_verdict(bool(fr) and max(fr) - min(fr) <= 0.03)})"]), "",
                  "Where the time and memory went: the UNet is exported and converted as an fp16 graph (no fp32 "
                  "copy of its 860 M weights is ever made, and coremltools has half the bytes to fold, cast and "
                  "serialise); the memory-mapped checkpoint's UNet pages are handed back to the OS as soon as the "
                  "export module holds a copy; chunks are carved one at a time from the saved package, with a "
                  "collect between loads. Peak RSS counts file-backed pages of the mapped checkpoint too.", ""]
    if "quantized" in r:
        q = r["quantized"]
        qs = q.get("quantization") or {}
        unet_s = q["stages"].get("unet", {}).get("seconds", q["total_s"])
        fr = q.get("chunk_fractions") or []
        lines += ["## 6-bit palettized UNet", "",
                  _row("UNet stage s", "Apple s", "ratio", "bytes vs fp16", "Apple", "chunk split", "peak GB"),
                  _row(*["---"] * 7),
                  _row(unet_s, APPLE["unet_6bit"], f"{unet_s / APPLE['unet_6bit']:.2f}x",
                       f"{qs.get('ratio', float('nan')):.3f}x", APPLE["q6_ratio"],
                       " / ".join(f"{100 * f:.1f} %" for f in fr), q["peak_gb"]), "",
                  f"Targets: time <= 0.5x Apple ({_verdict(unet_s <= 0.5 * APPLE['unet_6bit'])}); "
                  f"bytes <= 0.38x fp16 ({_verdict(qs.get('ratio', 1) <= 0.38)}); "
                  f"peak <= 5 GB ({_verdict(q['peak_gb'] <= 5)}).", "",
                  "k-means runs on each fp16 weight's histogram of distinct values (at most 65,536 of them, "
                  "whatever the weight's size) with the best of three Lloyd starts, instead of scikit-learn over "
                  "every element: same squared error within 6 % (tests/test_kmeans.py), in milliseconds per weight.",
                  ""]
    if "executor" in r:
        e = r["executor"]
        lines += ["## MIL reference executor vs PyTorch (full UNet, batch 2, latent "
                  f"{e['latent'][2]}x{e['latent'][3]})", "",
                  _row("executor s", "torch forward s", "ratio", "PSNR dB", "max abs"), _row(*["---"] * 5),
                  _row(f"{e['executor_s']:.2f}", f"{e['torch_s']:.2f}", f"{e['ratio']:.2f}x", f"{e['psnr']:.1f}",
                       f"{e['max_abs']:.4f}"), "",
                  f"Target: <= 2x the PyTorch forward ({_verdict(e['ratio'] <= 2)}). Package load: "
                  f"{e['load_s']:.1f} s.", ""]
    if "generation" in r:
        g = r["generation"]
        ratio = g.get("step_ratio", g["mlsd_step_s"] / g["diffusers_step_s"])
        lines += [f"## Fallback generation, CPU ({g['size']}x{g['size']}, {g['steps']} steps, {g['sampler']}, "
                  f"CFG 7, fp32, {g['threads']} threads)", "",
                  "Both sides run the same UNet/VAE/text-encoder modules; seconds per step are from the first UNet "
                  f"call to the last, medians of {g['pairs']} alternating pairs.", "",
                  _row("", "s / step", "wall s / image"), _row("---", "---", "---"),
                  _row("mlsd", f"{g['mlsd_step_s']:.3f}", f"{g['mlsd_wall_s']:.2f}"),
                  _row("diffusers", f"{g['diffusers_step_s']:.3f}", f"{g['diffusers_wall_s']:.2f}"),
                  _row("ratio (median of per-pair ratios)", f"{ratio:.3f}x",
                       f"{g['mlsd_wall_s'] / g['diffusers_wall_s']:.3f}x"), "",
                  f"Same image: PSNR {g['psnr_mlsd_vs_diffusers']:.1f} dB between the two. "
                  f"Target <= 1.00x per step ({_verdict(ratio <= 1.0)}). Peak RSS {g['peak_rss_gb']:.1f} GB.", "",
                  _row("CPU mode", "s / step", "speed-up vs diffusers fp32", "PSNR vs fp32 image",
                       "first image s (warm-up, compile)"),
                  _row(*["---"] * 5)]
        for mode in g["modes"]:
            lines.append(_row(mode["mode"], f"{mode['step_s']:.3f}",
                              f"{g['diffusers_step_s'] / mode['step_s']:.2f}x", f"{mode['psnr_vs_fp32']:.1f}",
                              f"{mode.get('warmup_s', float('nan')):.1f}"))
        if g.get("unet_gflop_per_step"):
            flop = g["unet_gflop_per_step"]
            rates = ", ".join([f"diffusers {flop / g['diffusers_step_s']:.0f}"]
                              + [f"{m['mode'].split(' (')[0]} {flop / m['step_s']:.0f}" for m in g["modes"]])
            lines += ["", f"One step's UNet call is {flop:.0f} GFLOP (torch's FLOP counter), so the rates are "
                      f"(GFLOP/s): {rates}. This CPU's fp32 peak is about {_cpu_peak(r['machine']):.0f} GFLOP/s "
                      "(cores x base clock x 32 FLOP/cycle: two 256-bit FMA pipes; boost clocks give a little more), "
                      "which caps any exact-fp32 "
                      f"speed-up over diffusers; {_bf16_note(r['machine'])}"]
        best = max(g["modes"], key=lambda x: g["diffusers_step_s"] / x["step_s"] if x["psnr_vs_fp32"] >= 30 else 0)
        speed = g["diffusers_step_s"] / best["step_s"]
        p = g["preview"]
        lines += ["", f"Fastest mode with PSNR >= 30 dB: {best['mode']}, {speed:.2f}x "
                  f"(target >= 1.4x: {_verdict(speed >= 1.4 and best['psnr_vs_fp32'] >= 30)}).", "",
                  f"Preview: {p['preview_ms']:.1f} ms per step-preview against {p['step_s']:.2f} s per step = "
                  f"{100 * p['overhead']:.2f} % (target <= 3 %: {_verdict(p['overhead'] <= 0.03)}).", ""]
    lines += ["## GPUs (not measured here: this machine has none)", "",
              "CUDA: fp16 weights and activations, attention through PyTorch's scaled_dot_product_attention "
              "(diffusers' default processor: flash / memory-efficient kernels), no attention slicing (it only "
              "trades speed for memory the GPU has), and an fp32 re-decode when the fp16 VAE overflows. MPS: fp16 "
              "plus attention slicing 'auto', because unified memory is shared with the OS and the peak matters "
              "more than a few percent of speed. `--compile` compiles without weight freezing off the CPU "
              "(untested on GPUs).", ""]
    return "\n".join(lines)
