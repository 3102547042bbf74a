"""`mlsd verify`: every package of a converted bundle, proven against its PyTorch source on Linux."""

from __future__ import annotations

import json
import shutil

import pytest

from converters.coreml.verify import GATE_DB, verify_bundle
from mlsd.cli import main


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundles("sd1-2chunks", chunks=2), copy)
    return copy


def test_every_package_passes_the_gate_and_is_recorded(bundle_copy):
    checks = verify_bundle(bundle_copy)
    assert {(c.component, c.output) for c in checks} == {
        ("text_encoder", "last_hidden_state"), ("text_encoder", "pooled_outputs"), ("unet", "noise_pred"),
        ("vae_decoder", "image"), ("vae_encoder", "latent")}
    for c in checks:
        print(f"{c.component}.{c.output}: {c.psnr:.1f} dB, max abs {c.max_abs:.2e}")
        assert c.psnr >= GATE_DB and c.passed
    recorded = json.loads((bundle_copy / "mlsd.json").read_text())["verification"]
    assert recorded["gate_db"] == GATE_DB and all(r["passed"] for r in recorded["results"])


def test_wrong_source_fails_the_gate(bundle_copy, tiny_checkpoints, capsys):
    other, _ = tiny_checkpoints("sd1", seed=7)  # same architecture, different weights
    rc = main(["verify", str(bundle_copy), "--against", str(other)])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out
    assert main(["verify", str(bundle_copy)]) == 0


def test_palettized_bundle_is_gated_against_its_dequantized_weights(tiny_bundles, tiny_checkpoints):
    bundle = tiny_bundles("q6-3chunks", chunks=3, quantize_bits=6, components=("unet",))
    same, loss = verify_bundle(bundle, write=False)
    assert same.gated and same.passed and same.psnr >= 35
    # k-means moves the weights: the full-precision comparison is reported, ungated, and clearly worse.
    assert loss.output == "noise_pred vs full precision" and not loss.gated and 10 < loss.psnr < same.psnr - 3
    # Negative control: the same palettized weights put into the wrong source's other layers.
    other, _ = tiny_checkpoints("sd1", seed=7)
    wrong, _ = verify_bundle(bundle, against=other, write=False)
    assert wrong.gated and not wrong.passed


def test_palettized_twin_holds_the_packages_weights(tiny_bundles):
    """Every palettized const lands in a parameter, with at most 2**bits distinct values per tensor."""
    import json

    from converters.coreml.verify import palettized_twin, source_model
    from mlsd.coreml import Executor

    bundle = tiny_bundles("q6-3chunks", chunks=3, quantize_bits=6, components=("unet",))
    manifest = json.loads((bundle / "mlsd.json").read_text())
    model = source_model(manifest)
    parts = [Executor(bundle / n) for n in manifest["components"]["unet"]["files"]]
    twin = palettized_twin(model.unet, parts, "split_einsum")
    big = [p for n, p in twin.named_parameters() if p.numel() > 4096]
    assert big and all(p.unique().numel() <= 64 for p in big)


def test_weights_named_elsewhere_find_their_parameter_by_value(tiny_bundles):
    """Packages converted by other tools name weights their own way: matching falls back to values."""
    import json

    import torch

    from converters.coreml.ane.unet import AneUNet
    from converters.coreml.verify import adopt_weights, source_model
    from mlsd.coreml.weights import constexpr_weights

    bundle = tiny_bundles("q6-3chunks", chunks=3, quantize_bits=6, components=("unet",))
    manifest = json.loads((bundle / "mlsd.json").read_text())
    unet = source_model(manifest).unet
    dense = {}
    for name in manifest["components"]["unet"]["files"]:
        dense |= constexpr_weights(bundle / name)
    by_name, by_value = (AneUNet.from_diffusers(unet) for _ in range(2))
    adopt_weights(by_name, dense)
    adopt_weights(by_value, {f"unet_weight_{i}": v for i, v in enumerate(dense.values())})
    for (name, a), b in zip(by_name.named_parameters(), by_value.parameters(), strict=True):
        assert torch.equal(a, b), name
    # Negative control: a weight from nowhere fits no parameter.
    stray = next(iter(dense.values()))
    with pytest.raises(RuntimeError, match="fits no UNet parameter"):
        adopt_weights(AneUNet.from_diffusers(unet), {"stray": torch.randn_like(stray.float()) * 10})


def test_executor_covers_every_op_of_converted_bundles(tiny_bundles):
    """Op coverage at 100 %: every op type in mlsd's own converted packages has an implementation."""
    from mlsd.coreml import load_program, supported_op_types

    bundles = [tiny_bundles("sd1-2chunks", chunks=2),
               tiny_bundles("q6-3chunks", chunks=3, quantize_bits=6, components=("unet",)),
               tiny_bundles("inpaint", inpainting=True, chunks=1, components=("unet",))]
    found = set()
    for bundle in bundles:
        for package in bundle.glob("*.mlpackage"):
            found |= set(load_program(package).op_types())
    assert {"einsum", "constexpr_lut_to_dense", "conv"} <= found  # split_einsum attention, palettized weights
    assert found - {"const"} <= set(supported_op_types()), sorted(found - set(supported_op_types()))


def test_inpainting_bundle_passes(tiny_bundles):
    (unet,) = verify_bundle(tiny_bundles("inpaint", inpainting=True, chunks=1, components=("unet",)), write=False)
    assert unet.passed and unet.psnr >= GATE_DB
