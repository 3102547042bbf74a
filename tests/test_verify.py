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


def test_palettized_bundle_reports_its_loss_without_gating_it(tiny_bundles):
    checks = verify_bundle(tiny_bundles("q6-3chunks", chunks=3, quantize_bits=6, components=("unet",)),
                           write=False)
    (unet,) = checks
    assert not unet.gated and unet.passed and 10 < unet.psnr < 200


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
