"""The executor's fp16 op-boundary rounding: the in-place block form equals the two-cast form bit for bit."""

import torch

from mlsd.coreml.executor import round_to_fp16


def _values(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.logspace(-9, 5, n)[torch.randperm(n, generator=g)]
    # Overflow to inf, subnormals, ties, signed zeros, NaN and infinities, spread over the blocks.
    special = torch.tensor([65504.0, 65520.0, 70000.0, -1e6, 6e-8, 3e-8, -1e-7, 2**-14, 1 + 2**-11, 0.0, -0.0,
                            float("nan"), float("inf"), -float("inf")])
    x[:: n // len(special)][: len(special)] = special
    return x


def test_block_rounding_is_bit_identical_to_casting_twice():
    x = _values(3_000_001)  # not a multiple of the block
    want = x.to(torch.float16).to(torch.float32)
    got = round_to_fp16(x.clone(), {})
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert not torch.equal(x.nan_to_num(), got.nan_to_num())  # negative control: rounding changed values


def test_an_output_sharing_an_inputs_storage_is_not_rounded_in_place():
    x = _values(1_000_000)
    kept = x.clone()
    got = round_to_fp16(x, {"x": x})
    assert torch.equal(x.nan_to_num(), kept.nan_to_num())  # the input is untouched
    assert torch.equal(got.view(torch.int32), kept.to(torch.float16).to(torch.float32).view(torch.int32))
    view = x.view(1000, 1000)[:, :500]
    got = round_to_fp16(view, {})  # a view could alias anything: copied too
    assert torch.equal(x.nan_to_num(), kept.nan_to_num())
