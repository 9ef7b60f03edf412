"""The integer program agrees with the float64 fake-quant module on zoo models (the issue's bar)."""

import math

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
    if report.overflows:  # only 8-bit POST: see test_verify_reports_accumulator_overflows
        assert "post" in passes and bits == 8 and all("shift_acc" in o for o in report.overflows), report.text()
        assert not report.ok()
        assert all(la.untied_identical >= 0.999 for la in report.layers) and report.classes_agree >= 0.995, report.text()
        return
    assert report.ok(identical=0.999, max_diff=1, classes=0.995), report.text()


def test_verify_reports_accumulator_overflows():
    """8-bit POST spans sqrt2^-126..1: shifted that far, its odd levels' 24-bit table products pass the
    shift_acc instruction's 48 bits. program.run raises there; verify (which records instead, to compare
    every code) must say so and fail, even though the codes, computed exactly in int64, agree."""
    from qcompiler.runtime.interpreter import AccumulatorOverflow

    data = load_digits()
    torch.manual_seed(0)
    c = qcompiler.compile(MODELS["resnet20"](), qcompiler.QuantSpec(passes="lsq,post", weight_bits=8, act_bits=8),
                          calib_data=data)
    program = c.lower()
    report = program.verify(c, data.x_test.numpy())
    assert report.overflows and not report.ok()
    assert "accumulator overflows" in report.text()
    with pytest.raises(AccumulatorOverflow) as raised:
        program.run(data.x_test.numpy())
    assert str(raised.value) in report.overflows


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


class _DenseBlock(torch.nn.Module):
    """DenseNet's pattern: a layer's output joins two concatenations, so the second requantizes its codes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv_a = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(8, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(12, 6, 1)
        self.fc = torch.nn.Linear(6, 10)

    def forward(self, x):
        x0 = torch.relu(self.conv0(x))
        a = torch.relu(self.conv_a(x0))
        b = torch.relu(self.conv_b(torch.cat([x0, a], 1)))
        return self.fc(self.head(torch.cat([x0, a, b], 1)).mean((2, 3)))


def test_exact_ties_are_counted_not_failed():
    """Steps 5u and 6u: a sixth of the requantized codes land exactly half-way, which the program's
    fixed-point 5/6 decides one way and the module half to even; ok() judges the other codes."""
    data = load_digits()
    torch.manual_seed(0)
    c = qcompiler.compile(_DenseBlock(), qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8), calib_data=data)
    joined, head = c.module.get_submodule("relu_1_join"), c.module.get_submodule("head_act")
    unit = 2.0 ** math.floor(math.log2(float(joined.step.detach()) / 5))
    with torch.no_grad():
        joined.step.fill_(5 * unit)
        head.step.fill_(6 * unit)
    program = c.lower()
    report = program.verify(c, data.x_test.numpy())
    layer = next(la for la in report.layers if la.name == "head_act")
    assert layer.ties > 1000 and layer.identical < 0.99  # many ties, decided apart
    assert layer.untied_identical == 1.0 and layer.max_diff == 1 and report.first_divergent is None
    assert report.ok(), report.text()
    # codes off the ties that differ still fail: the module's step moves after lowering
    with torch.no_grad():
        head.step.mul_(1.01)
    assert not program.verify(c, data.x_test.numpy()).ok()


def test_reference_keeps_the_float32_weight_codes_at_a_float64_near_tie():
    """A weight whose w / step is -18.5 in float32 (a tie, so code -18) but -18.5000006 in float64
    (code -19): the program, both ONNX forms and the recorded codes use -18; the float64 reference
    must too, or verify reports a disagreement the deployed model does not have (VGG-11 had one)."""
    from qcompiler.runtime.agreement import reference_codes

    w, step = -0.014129559509456158, 0.0007637599483132362  # both float32 numbers
    assert float(torch.tensor(w) / torch.tensor(step)) == -18.5 and w / step < -18.5
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.ReLU(), torch.nn.Linear(1, 2))
    x = torch.rand(256, 1) + 0.5
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8, pin_first_last=False),
                          calib_data=-x)
    layer = c.module.get_submodule("0")
    with torch.no_grad():
        layer.weight.fill_(w)
        layer.weight_quant.step.fill_(step)
    assert layer.weight_quant.codes(layer.weight).item() == -18
    program = c.lower()
    report = program.verify(c, -x.numpy())
    assert report.first_divergent is None and all(la.identical == 1.0 for la in report.layers), report.text()
    _, codes = reference_codes(c, -x.numpy())
    assert any(codes[name][0].any() for name in codes)  # the layer's output is not all clipped away
