"""Layer kinds beyond plain conv/linear: each compiles, is quantized (its records show the grid and
width) and at 8 bits stays within 2 % (relative L2) of float right after compile.

The 8-bit bar is checked from the default steps (``init="mse"``, the least-error clip per
tensor and per weight channel), with no training.

Last section: a QAT convolution and its weight quantizer as one autograd node give the two
nodes' outputs and gradients bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler import ir, kernels
from qcompiler.nn.exact import bn_link, grid_of, plan_layer
from qcompiler.nn.layout import channel_weight, from_channel_first
from qcompiler.nn.qat import QConv1d, QConv2d, QConv3d, QConvTranspose1d, QConvTranspose2d, QEmbedding, QLinear
from qcompiler.quantizers.asq import ASQQuantizer
from qcompiler.quantizers.power_grid import PowerGridQuantizer
from qcompiler.quantizers.uniform import UniformQuantizer
from small_models import Upsampler


class _Up1d(nn.Module):
    """A transposed conv called with ``output_size`` (the traced output_padding is what it chose)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.t = nn.Conv1d(2, 6, 3), nn.ConvTranspose1d(6, 3, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t(torch.relu(self.c(x)), output_size=[2 * x.shape[-1] - 2])


class MyConv(nn.Conv2d):
    """A subclass adding a method only: a conv2d."""

    def describe(self) -> str:
        return "mine"


class MyLinear(nn.Linear):
    pass


class _Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = MyConv(2, 4, 3), MyLinear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.fc = nn.Linear(2, 16), nn.MultiheadAttention(16, 4), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).transpose(0, 1)  # (L, N, E): batch_first=False
        y, _ = self.attn(h, h, h, need_weights=False)
        return self.fc(y.mean(0))


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


torch.manual_seed(0)
CASES = {
    # model, calibration data, {layer: (kind, QAT class, weight granularity)}
    "conv_transpose": (Upsampler, lambda: torch.randn(64, 2, 6, 6),
                       {"t": ("conv_transpose2d", QConvTranspose2d, "per-channel"),
                        "t2": ("conv_transpose2d", QConvTranspose2d, "per-channel")}),
    "conv_transpose1d": (_Up1d, lambda: torch.randn(64, 2, 12),
                         {"t": ("conv_transpose1d", QConvTranspose1d, "per-channel")}),
    "subclasses": (_Sub, lambda: torch.randn(64, 2, 6, 6),
                   {"c": ("conv2d", QConv2d, "per-channel"), "fc": ("linear", QLinear, "per-channel")}),
    "attention": (_Attention, lambda: torch.randn(64, 5, 2),
                  {f"attn_{p}_proj": ("linear", QLinear, "per-channel") for p in "qkv"}
                  | {"attn_out_proj": ("linear", QLinear, "per-channel")}),
    "embedding": (_Lookup, lambda: torch.randint(0, 50, (64, 7)), {"emb": ("embedding", QEmbedding, "per-row")}),
}


def _compile(case: str, passes: str = "lsq", bits: int = 8) -> tuple[nn.Module, torch.Tensor, qcompiler.Compiled]:
    make, data, _ = CASES[case]
    torch.manual_seed(0)
    model, x = make().eval(), data()
    return model, x, qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits), calib_data=x)


def relative_error(model: nn.Module, c: qcompiler.Compiled, x: torch.Tensor) -> float:
    with torch.no_grad():
        want, got = model(x), c.module.eval()(x)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("case", CASES)
def test_each_layer_kind_is_quantized_and_8_bit_is_within_2_percent(case: str) -> None:
    model, x, c = _compile(case)
    layers = {n.name: n for n in ir.compute_layers(c.module)}
    rows = {r.name: r for r in c.report.layers}
    for name, (kind, cls, per) in CASES[case][2].items():
        assert ir.get(layers[name], ir.LAYER, ir.LayerInfo).kind == kind
        assert ir.get(layers[name], ir.WEIGHT, ir.WeightQuant) == ir.WeightQuant(
            "uniform", 8, per, f"{layers[name].target}.weight_quant", init="mse")
        assert type(c.module.get_submodule(layers[name].target)) is cls
        assert rows[name].weight_bits == 8 and not rows[name].float_reason
        assert (kind == "embedding") == (ir.input_act(layers[name]) is None)  # an embedding reads indices
    assert relative_error(model, c, x) < 0.02  # from the default (least-error) steps, no training


@pytest.mark.parametrize("passes,grid", [("lsq,pot", "pot"), ("lsq,post", "post"), ("asq", "uniform")])
def test_transposed_convs_go_through_every_weight_grid(passes: str, grid: str) -> None:
    model, x, c = _compile("conv_transpose", passes)
    t = next(n for n in ir.compute_layers(c.module) if n.name == "t")
    assert ir.get(t, ir.WEIGHT, ir.WeightQuant).grid == grid
    codes = ir.get(t, ir.CODES, ir.WeightCodes)
    assert codes.codes.shape == (6, 4, 3, 3) and codes.scale.shape == (6,)  # output channel first
    assert relative_error(model, c, x) < 0.1


def test_transposed_conv_deploys_on_integer_codes_matching_the_training_formula() -> None:
    _, x, c = _compile("conv_transpose")
    gm = c.module.eval()
    seen = {}
    for name in ("t", "t2"):
        gm.get_submodule(name).register_forward_hook(lambda m, inp, out, name=name: seen.setdefault(name, (inp[0], out)) and None)
    with torch.no_grad():
        gm(x)
    # both take the integer form on their input's codes (what frozen_layer runs); t folds its batch norm
    for name in ("t", "t2"):
        t, (xq, _) = gm.get_submodule(name), seen[name]
        grid = grid_of(xq)
        weight = t.weight_quant.integer_weight(channel_weight(t).detach())
        assert grid is not None and plan_layer(weight, t.bias, bn_link(t), grid.bound, grid.step) is not None
    assert bn_link(gm.get_submodule("t")) is gm.get_submodule("bn")
    # t2 (no batch norm): the transposed conv of the dequantized weights, up to the bias, which the
    # deployed form adds in whole accumulator steps (exact.integer_bias): half a step at most
    t2, (xq, deployed) = gm.get_submodule("t2"), seen["t2"]
    w = from_channel_first(t2.weight_quant(channel_weight(t2)), t2.groups).detach()
    want = F.conv_transpose2d(xq, w, t2.bias.detach(), t2.stride, t2.padding, t2.output_padding, t2.groups, t2.dilation)
    half_step = (0.5 * grid_of(xq).step * t2.weight_quant.step.detach()).reshape(1, -1, 1, 1)
    assert torch.all((deployed - want).abs() <= half_step + 1e-6)


def test_weight_codes_decode_to_what_the_layer_convolves_with() -> None:
    _, _, c = _compile("conv_transpose1d")
    t = c.module.get_submodule("t")
    codes = ir.get(next(n for n in ir.compute_layers(c.module) if n.name == "t"), ir.CODES, ir.WeightCodes)
    decoded = codes.codes.double() * codes.scale.double().reshape(-1, 1, 1)
    torch.testing.assert_close(decoded.float(), t.weight_quant(channel_weight(t)).detach())


def test_embedding_with_max_norm_stays_float_with_its_reason() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2)).eval()
    with pytest.warns(qcompiler.api.FloatLayerWarning):
        c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randint(0, 10, (16, 3)))
    row = {r.name: r for r in c.report.layers}["_0"]
    assert row.weight_bits is None and "max_norm" in row.float_reason


# ---- a QAT convolution and its weight quantizer as one autograd node ---------------------------


CONVS = {1: (QConv1d, 9), 2: (QConv2d, 7), 3: (QConv3d, 5)}


def _qconv(dims: int, grid: str = "post", bits: int = 4, **conv) -> nn.Module:
    cls, _ = CONVS[dims]
    torch.manual_seed(dims)
    layer = cls(4, 6, 3, **conv)
    if grid == "uniform":
        layer.weight_quant = UniformQuantizer(bits, signed=True, channels=6)
    else:
        layer.weight_quant = PowerGridQuantizer(bits, grid, channels=6)
    layer.weight_quant.init_from(layer.weight)
    return layer.train()


def _two_nodes(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward as it is without the one-node path: quantizer, then convolution."""
    return layer._conv_forward(x, layer.weight_quant(layer.weight), layer.bias)


def _grads(layer: nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, list]:
    for p in [x, *layer.parameters()]:
        p.grad = None
    y = forward(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in (x, *layer.parameters())]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("conv", [{}, {"stride": 2, "padding": 1, "bias": False}, {"dilation": 2, "groups": 2, "padding": 2}])
@pytest.mark.parametrize("grid", ["pot", "post", "uniform"])
def test_one_node_conv_gives_the_two_nodes_values_bit_for_bit(dims, conv, grid):
    layer = _qconv(dims, grid, **conv)
    x = torch.randn(3, 4, *[CONVS[dims][1]] * dims, requires_grad=True)
    y1, g1 = _grads(layer, x, layer)
    y2, g2 = _grads(layer, x, lambda v: _two_nodes(layer, v))
    assert torch.equal(y1, y2)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))
    assert g1[0] is not None and all(g is not None for g in g1[1:])  # x, weight, (bias), alpha
    fused = kernels.usable(layer.weight, next(layer.weight_quant.parameters()), build=False, per_row=True) is not None
    assert (type(layer(x).grad_fn).__name__ == "_OneNodeConvBackward") == fused


@pytest.mark.parametrize("grid", ["post", "uniform"])
@pytest.mark.parametrize("frozen", ["input", "weight", "scale", "all but bias"])
def test_one_node_conv_computes_only_the_gradients_asked_for(frozen, grid):
    layer = _qconv(2, grid)
    x = torch.randn(2, 4, 7, 7, requires_grad=frozen != "input")
    if frozen in ("weight", "all but bias"):
        layer.weight.requires_grad_(False)
    if frozen in ("scale", "all but bias"):
        next(layer.weight_quant.parameters()).requires_grad_(False)
    y1, g1 = _grads(layer, x, layer)
    y2, g2 = _grads(layer, x, lambda v: _two_nodes(layer, v))
    assert torch.equal(y1, y2)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))
    assert (g1[0] is None) == (frozen == "input")
    assert g1[2] is not None  # the bias always learns here


def test_one_node_conv_is_skipped_where_the_two_nodes_must_run():
    x = torch.randn(2, 4, 7, 7)
    # a hook on the quantizer sees its call; reflect padding and padding="same" go through _conv_forward
    hooked = _qconv(2)
    seen = []
    hooked.weight_quant.register_forward_hook(lambda m, i, o: seen.append(o))
    hooked(x)
    assert len(seen) == 1
    for layer in (_qconv(2, padding=1, padding_mode="reflect"), _qconv(2, padding="same")):
        assert torch.equal(layer(x), _two_nodes(layer, x))
        assert type(layer(x).grad_fn).__name__ != "_OneNodeConvBackward"
    with torch.no_grad():  # nothing to differentiate: no autograd node at all
        plain = _qconv(2)
        assert torch.equal(plain(x), _two_nodes(plain, x))
    # an activation quantizer subclass offers no weight kernels
    assert ASQQuantizer(4, signed=True, channels=4).weight_kernels is None
