"""`make bench` plumbing on tiny models: the figures it reports are measured, not assumed.

Speed is never asserted here (benchmarks measure it); these tests check that the harness compares
like with like and that its memory sampler sees what a stage allocates.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.measure import RssSampler, median_pairs


def test_rss_sampler_attributes_an_allocation_to_its_stage():
    sampler = RssSampler(interval=0.01)
    sampler.mark("idle")
    sampler.mark("allocate")
    block = np.ones(300_000_000 // 8)  # 300 MB, touched
    del block  # large blocks go back to the OS at once
    sampler.mark("freed")
    sampler.stop()
    stages = {name: peak for name, _, peak in sampler.stages}
    assert stages["allocate"] - stages["idle"] > 250e6
    assert stages["freed"] < stages["allocate"] - 250e6  # negative control: the peak belongs to one stage


def test_median_pairs_alternates_the_order():
    calls = []
    median_pairs(lambda: calls.append("a"), lambda: calls.append("b"), pairs=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]


@pytest.fixture(scope="module")
def generation(tiny_checkpoints):
    from bench.generation import bench_generation

    path, _ = tiny_checkpoints("sd1")
    return bench_generation(path, size=64, steps=2, pairs=1)


def test_generation_bench_compares_the_same_image(generation):
    # Same modules, sampler and seed: the two loops must draw the same picture, or the timing is unfair.
    assert generation["psnr_mlsd_vs_diffusers"] > 40
    assert generation["mlsd_step_s"] > 0 and generation["diffusers_step_s"] > 0
    from mlsd.backends.torch_backend import has_cpp_compiler

    modes = {m["mode"].split(" (")[0]: m for m in generation["modes"]}
    assert set(modes) == {"fp32 channels-last", "bf16"} | ({"fp32 --compile"} if has_cpp_compiler() else set())
    assert modes["fp32 channels-last"]["psnr_vs_fp32"] > modes["bf16"]["psnr_vs_fp32"]  # layout < precision loss
    if has_cpp_compiler():
        # The compiled UNet computes the same fp32 function (fused, reordered sums): the image stays.
        assert modes["fp32 --compile"]["psnr_vs_fp32"] > 40
    assert 0 < generation["preview"]["overhead"] < 10


def test_report_states_each_target(generation):
    from bench.report import render

    text = render({"machine": {"os": "Linux", "cpu": "x", "cores": 2, "memory_gb": 24, "python": "3.11",
                               "torch": "t", "coremltools": "c", "diffusers": "d"},
                   "date": "2026-11-25", "generation": generation})
    assert "Fallback generation" in text and "Target <= 1.00x per step" in text and "Preview:" in text
