"""The integer program agrees with the float64 fake-quant module on zoo models (the issue's bar)."""

import pytest
import torch

import qcompiler
from qcompiler.data import load_digits
from qcompiler.zoo import plain_cnn, resnet20

MODELS = {"resnet20": lambda: resnet20(in_channels=1, width=4), "plain_cnn": lambda: plain_cnn(width=4)}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("passes", ["lsq", "asq"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_program_agrees_with_float64_module(model, passes, bits):
    data = load_digits()
    torch.manual_seed(0)
    c = qcompiler.compile(MODELS[model](), qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits),
                          calib_data=data)
    report = c.lower().verify(c, data.x_test.numpy())
    assert report.ok(identical=0.999, max_diff=1, classes=0.995), report.text()
