"""Short QAT on real data (digits): 4-bit models stay within 2 points of float."""

import pytest
import torch

import qcompiler
from qcompiler.data import load_digits
from qcompiler.train import TrainConfig, evaluate, train
from qcompiler.zoo import resnet20


@pytest.fixture(scope="module")
def float_model():
    data = load_digits()
    torch.manual_seed(0)
    model = resnet20(in_channels=1, num_classes=10, width=8)
    train(model, data, TrainConfig(epochs=8, lr=0.1, seed=0), progress=False)
    return model, evaluate(model, data)


@pytest.mark.parametrize("passes", ["lsq", "asq,post"])
def test_4bit_qat_is_within_2_points_of_float(float_model, passes):
    model, float_acc = float_model
    data = load_digits()
    assert float_acc > 90.0  # the float recipe itself works
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=4, act_bits=4), calib_data=data)
    train(compiled.module, data, TrainConfig(epochs=3, lr=0.01, seed=0), progress=False)
    acc = evaluate(compiled.module, data)
    assert acc >= float_acc - 2.0, f"{passes}: {acc:.2f} vs float {float_acc:.2f}"
