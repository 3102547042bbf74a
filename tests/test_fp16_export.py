"""The converter's fp16 export route (the UNet's) against the fp32 reference route, on a tiny UNet.

Both routes end in an fp16 ML Program; the fp16 one never holds an fp32 copy of the weights. They
must build the same ops and compute the same numbers, checked on the reference executor against the
PyTorch fp32 forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.coreml.ane.unet import AneUNet
from converters.coreml.export import op_types, to_mlprogram
from converters.coreml.unet import unet_example_inputs
from mlsd.checkpoints.load import load_model
from mlsd.coreml import Executor
from mlsd.coreml.testing import psnr

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def routes(tiny_checkpoints, tmp_path_factory):
    path, _ = tiny_checkpoints("sd1")
    unet = load_model(path, dtype=torch.float16).unet
    examples = unet_example_inputs(unet.config, (8, 8))
    fp16_in = {k: np.float16 for k in examples}
    out = tmp_path_factory.mktemp("routes")
    packages = {}
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        ane = AneUNet.from_diffusers(unet, dtype=dtype)
        model = to_mlprogram(ane, {k: v.to(dtype) for k, v in examples.items()}, input_dtypes=fp16_in,
                             output_names=["noise_pred"], output_dtypes={"noise_pred": np.float32})
        assert next(ane.parameters()).dtype == dtype
        packages[name] = out / f"{name}.mlpackage"
        model.save(str(packages[name]))
    reference = AneUNet.from_diffusers(unet)
    return packages, examples, reference


def _run(package, inputs) -> np.ndarray:
    return Executor(package).run({k: v.numpy().astype(np.float16) for k, v in inputs.items()})["noise_pred"]


def test_fp16_route_builds_the_same_program_and_numbers(routes):
    packages, examples, reference = routes
    assert op_types(packages["fp16"]) == op_types(packages["fp32"])
    with torch.no_grad():
        want = reference(*examples.values())
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    got16, got32 = _run(packages["fp16"], examples), _run(packages["fp32"], examples)
    assert psnr(got16, want) > 50 and abs(psnr(got16, want) - psnr(got32, want)) < 1.0
    # Negative control: another latent input lands far below the gate.
    other = dict(examples, sample=torch.randn(examples["sample"].shape, generator=torch.Generator().manual_seed(7)))
    assert psnr(_run(packages["fp16"], other), want) < 35


def test_fp16_module_needs_fp16_precision(routes):
    _, examples, reference = routes
    with pytest.raises(ValueError, match="fp16 module"):
        to_mlprogram(reference.half(), {k: v.half() for k, v in examples.items()}, output_names=["noise_pred"],
                     precision="fp32")
