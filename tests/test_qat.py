"""Short QAT on real data (digits): QAT recovers what quantization lost, measured from right after compile."""

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


def _compile_and_train(model, passes: str, bits: int, **spec) -> tuple[float, float]:
    """Accuracy right after compile (post-training quantization only) and after 3 QAT epochs."""
    data = load_digits()
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits, **spec),
                                 calib_data=data)
    before = evaluate(compiled.module, data)
    train(compiled.module, data, TrainConfig(epochs=3, lr=0.01, seed=0), progress=False)
    return before, evaluate(compiled.module, data)


@pytest.mark.parametrize("passes", ["lsq", "asq,post"])
def test_2bit_qat_recovers_what_compile_lost(float_model, passes):
    """At 2 bits the compiled model starts far below float (20-35 %); QAT must bring it back near float.

    With no working QAT (a zero gradient anywhere in the quantizers' backward pass,
    steps that do not learn) the accuracy stays near where compile left it.
    """
    model, float_acc = float_model
    assert float_acc > 90.0  # the float recipe itself works
    before, after = _compile_and_train(model, passes, bits=2)
    assert before < float_acc - 30, f"{passes}: 2-bit compile alone is already at {before:.2f}: nothing to recover"
    assert after >= before + 30, f"{passes}: QAT {before:.2f} -> {after:.2f}"
    assert after >= float_acc - 10, f"{passes}: {after:.2f} vs float {float_acc:.2f}"


def test_4bit_qat_improves_on_compile_and_ends_within_2_points_of_float(float_model):
    model, float_acc = float_model
    # without bias correction, so that compile leaves a gap for QAT to close: with it (the
    # default) 4-bit compile alone already lands at float's accuracy here (96.7-97.1 vs 96.9),
    # and "QAT improves on compile" would ask for more than float
    before, after = _compile_and_train(model, "asq,post", bits=4, bias_correction=False)
    assert after > before, f"QAT {before:.2f} -> {after:.2f}"
    assert after >= float_acc - 2.0, f"{after:.2f} vs float {float_acc:.2f}"
    data = load_digits()
    corrected = qcompiler.compile(model, qcompiler.QuantSpec(passes="asq,post", weight_bits=4, act_bits=4), calib_data=data)
    assert evaluate(corrected.module, data) >= float_acc - 2.0


@pytest.mark.parametrize("passes", ["lsq", "asq,post"])
def test_qat_gradients_reach_every_parameter_and_the_input(passes):
    """One backward pass through the compiled model: every trainable tensor and the input get a gradient.

    A quantizer whose backward pass drops the input gradient cuts every layer in
    front of it off from training; this finds it without training to convergence.
    """
    torch.manual_seed(0)
    model = resnet20(in_channels=1, num_classes=10, width=8)
    calib = torch.rand(32, 1, 8, 8)
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=4, act_bits=4), calib_data=calib)
    module = compiled.module.train()
    x = calib[:8].clone().requires_grad_()
    torch.nn.functional.cross_entropy(module(x), torch.arange(8)).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    # An adapter's fc1 and fc2.weight see no gradient where all its hidden ReLUs are off
    # for this batch (it happens on a 1x1 feature map); its fc2.bias always does.
    checked = [(n, p) for n, p in module.named_parameters()
               if p.requires_grad and (".adapter." not in n or n.endswith("fc2.bias"))]
    assert len(checked) > 20
    silent = [n for n, p in checked if p.grad is None or not bool(p.grad.any())]
    assert not silent, f"no gradient for {silent}"
