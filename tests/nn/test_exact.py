"""Deployed numerics: layers too wide for one exact float32 sum are summed in input-channel ranges."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompiler
from qcompiler.nn import exact
from qcompiler.runtime.onnx_export import onnx_parity, to_onnx


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 2**16), st.integers(0, 2**31 - 1))
def test_input_chunks_keep_every_partial_sum_exact_and_cover_the_channels(channels, outs, x_bound, seed):
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-127, 128, (outs, channels, 3, 3), generator=g)
    chunks = exact.input_chunks(exact.IntegerWeight(ints, torch.ones(outs)), x_bound)
    if chunks is None:  # only when one channel alone reaches the bound
        assert int((ints.abs().sum((2, 3)) * x_bound).max()) >= exact.F32_EXACT
        return
    assert chunks[0][0] == 0 and chunks[-1][1] == channels
    assert all(a < b and b == c for (a, b), (c, _) in zip(chunks, chunks[1:] + ((chunks[-1][1], None),)))
    for a, b in chunks:
        assert int((ints[:, a:b].abs().sum((1, 2, 3)) * x_bound).max()) < exact.F32_EXACT


def test_chunked_layer_is_the_exact_sum_where_one_float32_sum_is_not():
    torch.manual_seed(0)
    codes = torch.randint(0, 256, (4, 128, 6, 6)).float()
    ints = torch.randint(100, 128, (8, 128, 3, 3)) * (torch.randint(0, 2, (8, 128, 3, 3)) * 2 - 1)
    weight = exact.IntegerWeight(ints, torch.full((8,), 0.5))
    assert not exact.exact_in(torch.float32, 255, ints)  # about 255 * 113 * 1152 = 3.3e7, past 2^24
    chunks = exact.input_chunks(weight, 255)
    assert len(chunks) > 1
    grid = exact.Grid(torch.tensor(0.25), 255)
    calls = []
    y = exact.integer_layer(codes * 0.25, grid, weight, lambda c, w: calls.append(c.dtype) or F.conv2d(c, w), None,
                            chunks=chunks)
    reference = F.conv2d(codes.double(), ints.double())  # exact: far below 2^53
    assert torch.equal(y, (reference.float() * torch.tensor(0.125)))  # one rounding to float32, then the scale
    # the ranges' total is one float64 sum (every partial sum an integer below 2^53), not one call per range:
    # 8-bit POST layers have hundreds of ranges per band, which made compiles and eval 5-10x slower
    assert calls == [torch.float64]


def test_wide_8bit_layers_run_on_integer_codes_and_match_onnx_bit_for_bit():
    """POST at 8 bits: the integer weights pass 2^24 in one sum; the layers still run on codes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(),
                          nn.Linear(16 * 64, 4)).eval()
    x = torch.randn(128, 1, 8, 8)
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq,post", weight_bits=8, act_bits=8), calib_data=x)
    c.freeze()
    proto = to_onnx(c.module)
    assert sum(n.op_type == "Slice" for n in proto.graph.node) >= 4  # the middle layers are summed in ranges
    from qcompiler.runtime.onnx_export import FLOAT_LAYERS

    assert FLOAT_LAYERS not in {p.key for p in proto.metadata_props}  # no layer fell back to the float formula
    parity = onnx_parity(c, proto, x)
    assert parity.max_abs_diff == 0.0 and parity.classes_agree == 1.0, parity.text()


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_layers_are_not_chunked(groups):
    # a range of input channels of a grouped convolution is not a convolution of those channels
    ints = torch.full((4, 512 // groups, 3, 3), 127)
    weight = exact.IntegerWeight(ints, torch.ones(4))
    assert exact.plan_layer(weight, None, None, 255, 1.0, chunkable=True).chunks  # ranges would exist
    assert exact.plan_layer(weight, None, None, 255, 1.0, chunkable=groups == 1) is None  # the float formula


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 31), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_weight_bands_add_back_to_the_weights_and_each_is_exact(top, channels, seed):
    g = torch.Generator().manual_seed(seed)
    ints = torch.sign(torch.randn(4, channels, 3, 3, generator=g)).long() * torch.pow(2, torch.randint(0, top + 1, (4, channels, 3, 3), generator=g))
    weight = exact.IntegerWeight(ints, torch.ones(4))
    planned = exact.band_plan(weight, 255)
    if planned is None:  # only where the weights already fit one band
        assert int(ints.abs().max()).bit_length() <= 12
        return
    bits, shifts, chunks = planned
    bands = [exact.weight_band(ints, shift, bits) for shift in shifts]
    assert torch.equal(sum(band * 2**shift for band, shift in zip(bands, shifts)), ints)
    for band in bands:
        for a, b in chunks:
            assert int((band[:, a:b].abs().sum((1, 2, 3)) * 255).max()) < exact.F32_EXACT
