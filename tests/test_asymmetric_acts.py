"""Asymmetric activation grids (``QuantSpec.asymmetric_acts``): chosen where they lose less,
recorded, and computed alike by the fake-quant module, the integer program and both ONNX forms."""

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.spec import SpecError
from qcompiler.data import load_digits

from numeric_checks import assert_backends_agree
from qcompiler.runtime.onnx_export import onnx_parity, to_onnx


class SkewedNet(nn.Module):
    """conv -> batch norm -> conv: the second conv reads the batch norm's output directly, mostly
    positive with a thin negative tail (as after a hardswish or SiLU, but on integer ops only)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def skewed_net() -> SkewedNet:
    torch.manual_seed(0)
    model = SkewedNet()
    data = load_digits()
    with torch.no_grad():
        model.train()
        model(data.x_train[:256])  # batch norm statistics of real inputs
        model.bn1.bias.fill_(1.8)  # ~4 % of each channel below zero
    return model.eval()


@pytest.fixture(scope="module")
def compiled_pair():
    data = load_digits()
    model = skewed_net()
    spec = qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8, pin_first_last=False)
    return (model, qcompiler.compile(model, spec, calib_data=data),
            qcompiler.compile(model, spec.replace(asymmetric_acts=True), calib_data=data))


def conv2_act(c) -> ir.ActQuant:
    layer = next(n for n in c.module.graph.nodes if n.target == "conv2")
    return ir.get(layer.args[0], ir.ACT, ir.ActQuant)


def test_the_skewed_input_gets_a_zero_point_and_the_report_says_so(compiled_pair):
    _, symmetric, asymmetric = compiled_pair
    assert conv2_act(symmetric).zero_point is None
    rec = conv2_act(asymmetric)
    assert rec.signed and 0 < rec.zero_point < 64, rec
    q = asymmetric.module.get_submodule(rec.module)
    assert (q.qmin, q.qmax) == (-rec.zero_point, 255 - rec.zero_point)
    row = next(r for r in asymmetric.report.layers if r.name == "conv2")
    assert f"asymmetric (zero point {rec.zero_point})" in row.act_quantizer
    assert f"zero_point={rec.zero_point}" in ir.format_record(rec)
    # a ReLU'd input stays unsigned: no zero point where no value is negative
    assert conv2_act(asymmetric) is not None
    fc = next(n for n in asymmetric.module.graph.nodes if n.target == "fc")
    assert ir.get(fc.args[0], ir.ACT, ir.ActQuant).zero_point is None


def test_asymmetric_grid_loses_less(compiled_pair):
    model, symmetric, asymmetric = compiled_pair
    x = load_digits().x_test
    with torch.no_grad():
        seen = model.bn1(model.conv1(x))  # what conv2 reads in float
        errors = []
        for c in (symmetric, asymmetric):
            q = c.module.get_submodule(conv2_act(c).module).eval()
            errors.append(float((q(seen) - seen).square().mean()))
    assert errors[1] < 0.6 * errors[0], errors


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
def test_backends_agree(compiled_pair, fmt):
    assert_backends_agree(compiled_pair[2], load_digits().x_test, fmt, outputs_to=None if fmt == "qdq" else 1e-4)


def test_qdq_zero_point_is_the_grids():
    import onnx
    from onnx import numpy_helper

    data = load_digits()
    c = qcompiler.compile(skewed_net(), qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8,
                                                            pin_first_last=False, asymmetric_acts=True), calib_data=data)
    rec = conv2_act(c)
    m = to_onnx(c.module, "qdq")
    onnx.checker.check_model(m)
    zero = next(t for t in m.graph.initializer if t.name == f"{rec.module}.zero_point")
    assert int(numpy_helper.to_array(zero)) == rec.zero_point


def test_cli_flag(tmp_path):
    from qcompiler.cli import _spec_from_args, build_parser

    args = build_parser().parse_args(["m.pt", "--asymmetric-acts"])
    assert _spec_from_args(args).asymmetric_acts is True
    assert _spec_from_args(build_parser().parse_args(["m.pt"])).asymmetric_acts is False


def test_spec_type_is_checked():
    with pytest.raises(SpecError, match="asymmetric_acts must be true or false"):
        qcompiler.QuantSpec(asymmetric_acts="yes")


def test_asq_takes_the_zero_point_too():
    data = load_digits()
    c = qcompiler.compile(skewed_net(), qcompiler.QuantSpec(passes="asq", weight_bits=8, act_bits=8,
                                                            pin_first_last=False, asymmetric_acts=True), calib_data=data)
    rec = conv2_act(c)
    assert rec.method == "asq" and rec.zero_point is not None
    q = c.module.get_submodule(rec.module)
    assert (q.qmin, q.qmax) == (-rec.zero_point, 255 - rec.zero_point)
    x = data.x_test[:64]
    codes = q.codes(torch.randn(64, 8, 8, 8))
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
    assert_backends_agree(c, x, "program")
    c.freeze()
    parity = onnx_parity(c, to_onnx(c.module), x)
    assert parity.classes_agree == 1.0 and parity.max_abs_diff <= 1e-4 * max(parity.output_range, 1e-6), parity.text()
