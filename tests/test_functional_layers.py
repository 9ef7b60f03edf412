"""qcompiler.functional_layers: functional layer calls with Parameter weights become quantized layer modules."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.frontend import trace
from numeric_checks import relative_error

SPEC8 = qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8)


class FunctionalNet(nn.Module):
    """One functional call of ``kind`` with Parameter weight and bias, between two ordinary layers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.stem = nn.Conv1d(2, 4, 3, padding=1) if kind.endswith("1d") else nn.Conv2d(2, 4, 3, padding=1)
        shapes = {
            "conv1d": (6, 2, 3), "conv2d": (6, 2, 3, 3),  # groups=2: 4 inputs, 2 per group
            "conv_transpose1d": (4, 3, 2), "conv_transpose2d": (4, 3, 2, 2), "linear": (6, 4 * 5 * 5),
        }
        self.w = nn.Parameter(torch.randn(*shapes[kind]) * 0.3)
        out = shapes[kind][0] if "transpose" not in kind else shapes[kind][1]
        self.b = nn.Parameter(torch.randn(out) * 0.1)
        self.head = nn.Linear(out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        if self.kind == "conv1d":
            h = F.conv1d(h, self.w, self.b, stride=2, padding=1, dilation=1, groups=2)
        elif self.kind == "conv2d":
            h = F.conv2d(h, self.w, self.b, 1, "same", 2, 2)  # positional, 'same' padding, dilation 2
        elif self.kind == "conv_transpose1d":
            h = F.conv_transpose1d(h, self.w, self.b, stride=2, output_padding=1)
        elif self.kind == "conv_transpose2d":
            h = F.conv_transpose2d(h, self.w, self.b, stride=2, padding=1)
        else:
            return self.head(torch.relu(F.linear(h.flatten(1), self.w, self.b)))
        return self.head(torch.relu(h).mean((2,) if self.kind.endswith("1d") else (2, 3)))


def _input(kind: str, n: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 2, 12) if kind.endswith("1d") else torch.randn(n, 2, 5, 5)


MODULE = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv_transpose1d": nn.ConvTranspose1d,
          "conv_transpose2d": nn.ConvTranspose2d, "linear": nn.Linear}
KINDS = list(MODULE)


@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_makes_a_module_sharing_the_parameters_and_computing_the_same(kind: str) -> None:
    model, x = FunctionalNet(kind).eval(), _input(kind, 4)
    before, modules = copy.deepcopy(model.state_dict()), list(model.named_modules())
    gm = trace(model, (x,))
    node = next(n for n in gm.graph.nodes if n.name == kind)  # named after the function it replaces
    assert node.op == "call_module" and not [n for n in gm.graph.nodes if n.target is getattr(F, kind)]
    module = gm.get_submodule(node.target)
    assert type(module) is MODULE[kind]
    # the very Parameters of the traced copy (one tensor: training it trains them), not the user's
    assert module.weight is gm.get_parameter("w") and module.bias is gm.get_parameter("b")
    assert module.weight is not model.w
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # same stride, padding, dilation, groups
    # the user's model is untouched: same parameters, same forward, no new attributes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(before)
    assert list(model.named_modules()) == modules and model.w.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_each_functional_kind_is_quantized_and_close_to_float_at_8_bits(kind: str) -> None:
    model, x = FunctionalNet(kind).eval(), _input(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qcompiler.api.FloatLayerWarning)  # nothing with weights stays float
        compiled = qcompiler.compile(model, SPEC8, calib_data=x)
    node = next(n for n in compiled.module.graph.nodes if n.name == kind)
    rec = ir.get(node, ir.WEIGHT, ir.WeightQuant)
    codes = ir.get(node, ir.CODES, ir.WeightCodes)
    w_shape = tuple(model.w.shape)
    if "transpose" in kind:  # codes are kept output channel first (qcompiler.nn.layout)
        w_shape = (w_shape[1], w_shape[0], *w_shape[2:])
    assert (rec.grid, rec.bits) == ("uniform", 8) and tuple(codes.codes.shape) == w_shape
    assert int(codes.codes.abs().max()) <= 127 and ir.input_act(node) is not None
    row = next(r for r in compiled.report.layers if r.name == kind)
    assert (row.weight_bits, row.act_bits, row.float_reason) == (8, 8, "")
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 0.02


def test_a_weight_used_at_two_sites_is_one_module_and_one_grid() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4) * 0.5)

        def forward(self, x):
            return F.linear(torch.relu(F.linear(x, self.w)), self.w)

    compiled = qcompiler.compile(Twice(), SPEC8, calib_data=torch.randn(16, 4))
    layers = ir.compute_layers(compiled.module)
    assert [n.target for n in layers] == ["linear", "linear"]  # one module, so one weight grid
    assert f"(shared: linear, {layers[1].name})" in compiled.report.layers[0].weight_quantizer
    assert compiled.module.get_submodule("linear").weight is compiled.module.get_parameter("w")


class NotLayers(nn.Module):
    """Functional calls that are not fixed layers: each stays float, and the table says why."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.register_buffer("buf", torch.randn(4, 4))
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = self.fc(x)
        a = F.linear(h, self.buf)  # a buffer, not a Parameter
        b = F.linear(h, self.w * 2.0)  # computed in forward from a Parameter
        c = F.linear(h, h.transpose(0, 1)[:, :4].t())  # from activations
        return a + b + c


def test_calls_that_are_not_layers_stay_float_with_the_reason_in_the_table() -> None:
    with pytest.warns(qcompiler.api.FloatLayerWarning, match="layer\\(s\\) with weights stay in float"):
        compiled = qcompiler.compile(NotLayers(), SPEC8, calib_data=torch.randn(16, 4))
    rows = {r.name: r for r in compiled.report.layers}
    assert rows["linear"].float_reason == "functional linear: its weight 'buf' is a buffer or tensor constant, not an nn.Parameter"
    assert rows["linear_1"].float_reason == "functional linear: its weight is computed in forward, not an nn.Parameter of the model"
    assert rows["linear_2"].float_reason == rows["linear_1"].float_reason
    assert rows["fc"].weight_bits == 8
    assert "fp32" in compiled.report.layer_table()


def test_a_tensor_argument_keeps_the_call_float() -> None:
    class TensorStride(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 1, 3))

        def forward(self, x):
            return F.conv1d(x, self.w, None, 1, x.shape[-1] // 8)  # padding follows the input's length

    gm = torch.fx.symbolic_trace(TensorStride())  # fx keeps the padding symbolic here
    from qcompiler.functional_layers import functional_to_modules

    assert functional_to_modules(gm) == []
    node = next(n for n in gm.graph.nodes if n.target is F.conv1d)
    assert ir.get(node, ir.FLOAT, ir.FloatRegion).reason == "functional conv1d: its argument 'padding' is computed in forward, not a constant"


def test_transposed_weights_become_linear_layers() -> None:
    """``x @ W`` and ``addmm(b, W)`` (transformers' Conv1D) with W stored (in, out)."""

    class InOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.w1, self.b2 = nn.Parameter(torch.randn(4, 6) * 0.5), nn.Parameter(torch.randn(3) * 0.1)
            self.w2 = nn.Parameter(torch.randn(6, 3) * 0.5)

        def forward(self, x):
            return torch.addmm(self.b2, torch.relu(x @ self.w1), self.w2)

    model, x = InOut().eval(), torch.randn(64, 4)
    gm = trace(model, (x[:2],))
    assert [type(gm.get_submodule(n.target)) for n in ir.compute_layers(gm)] == [nn.Linear, nn.Linear]
    assert not hasattr(gm, "w1") and gm.get_submodule("addmm").bias is gm.get_parameter("b2")  # (in, out) copy replaces it
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    compiled = qcompiler.compile(model, SPEC8, calib_data=x)
    assert [r.weight_bits for r in compiled.report.layers] == [8, 8]
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 0.02


def test_addmm_by_keyword_and_a_vector_weight() -> None:
    """torch's own names for addmm (``input`` is the bias); F.linear with a 1-d weight is no layer."""

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.b, self.w, self.v = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return F.linear(torch.addmm(input=self.b, mat1=x, mat2=self.w), self.v)

    model, x = Keywords().eval(), torch.randn(4, 4)
    gm = torch.fx.symbolic_trace(model)
    from qcompiler.functional_layers import functional_to_modules

    assert functional_to_modules(gm) == ["addmm"] and gm.get_submodule("addmm").bias is gm.get_parameter("b")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear)
    assert ir.get(node, ir.FLOAT, ir.FloatRegion).reason == "functional linear: its 1-d weight is not the 2-d weight of a layer"
