"""The integer program agrees with the float64 fake-quant module on zoo models (the issue's bar)."""

import pytest
import torch

import qcompiler
from qcompiler.data import load_digits
from qcompiler.zoo import adder_resnet20, plain_cnn, resnet20

MODELS = {"resnet20": lambda: resnet20(in_channels=1, width=4), "plain_cnn": lambda: plain_cnn(width=4)}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("passes", ["lsq", "lsq,pot", "lsq,post", "asq", "asq,post"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_program_agrees_with_float64_module(model, passes, bits):
    # (POST levels are float32 numbers in every dtype, so the float64 module and the
    # program's 0xB504F3 table agree; with float64 powers of sqrt 2 one near-tie code
    # of resnet20 at 8 bits flipped.)
    data = load_digits()
    torch.manual_seed(0)
    c = qcompiler.compile(MODELS[model](), qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits),
                          calib_data=data)
    report = c.lower().verify(c, data.x_test.numpy())
    assert report.ok(identical=0.999, max_diff=1, classes=0.995), report.text()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("passes", ["outlier-clamp,adder-groups", "adder-shared"])
def test_adder_program_agrees_with_float64_module(passes, bits):
    data = load_digits()
    torch.manual_seed(0)
    c = qcompiler.compile(adder_resnet20(in_channels=1, width=4),
                          qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits), calib_data=data)
    program = c.lower()
    assert "sad" in {i.op for i in program.instructions}
    report = program.verify(c, data.x_test.numpy())
    assert report.ok(identical=0.999, max_diff=1, classes=0.995), report.text()
