"""Tests for qcompiler.frontend: tracing, shapes, layer records, errors, model safety."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir, zoo
from qcompiler.errors import DataError, SpecError, TraceError
from qcompiler.frontend import trace
from qcompiler.nn.adder import AdderConv2d
from untraceable_helpers import Gate, GatedNet, RootBranch
from small_models import SMALL_KWARGS

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, AdderConv2d)
KINDS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Linear: "linear", AdderConv2d: "adder2d"}


def _small(name: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.build(name, in_channels=1, num_classes=10, **SMALL_KWARGS[name]).eval()


def _input(name: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 1, 64) if name == "conv1d_net" else torch.randn(batch, 1, 8, 8)


def test_small_kwargs_cover_the_zoo() -> None:
    assert set(SMALL_KWARGS) == set(zoo.ZOO)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_traces_to_same_output(name: str) -> None:
    model, x = _small(name), _input(name)
    gm = trace(model, (x,))
    assert gm is not model
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        # A different batch size runs too: shapes are recorded, not baked in.
        x5 = _input(name, batch=5)
        torch.testing.assert_close(gm(x5), model(x5))


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_conv_and_linear_gets_a_layer_record(name: str) -> None:
    model, x = _small(name), _input(name)
    gm = trace(model, (x,))
    expected = {n: m for n, m in model.named_modules() if type(m) in LAYER_TYPES}
    layers = ir.compute_layers(gm)
    assert sorted(str(n.target) for n in layers) == sorted(expected)
    for node in layers:
        info = ir.get(node, ir.LAYER, ir.LayerInfo)
        m = expected[str(node.target)]
        assert node.name == str(node.target).replace(".", "_")
        assert info.weight_shape == tuple(m.weight.shape)
        assert info.has_bias == (m.bias is not None)
        if isinstance(m, nn.Linear):
            assert info.kind == "linear"
            assert (info.in_channels, info.out_channels) == (m.in_features, m.out_features)
            assert info.macs == m.in_features * m.out_features
        else:
            assert info.kind == KINDS[type(m)]
            assert (info.in_channels, info.out_channels) == (m.in_channels, m.out_channels)
            assert info.groups == m.groups
            assert info.kernel_size == tuple(m.kernel_size) and info.stride == tuple(m.stride)
            assert info.input_shape[0] == m.in_channels and info.output_shape[0] == m.out_channels
            # out elements * (in_channels / groups) * kernel elements
            per_out = (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
            assert info.macs == per_out * int(torch.tensor(info.output_shape).prod())


def test_layer_records_hand_checked_resnet20() -> None:
    gm = trace(_small("resnet20"), (_input("resnet20"),))
    nodes = {n.name: n for n in gm.graph.nodes}
    stem = ir.get(nodes["stem_0"], ir.LAYER, ir.LayerInfo)
    # Conv2d(1, 8, 3, padding=1) on 8x8: 8 * 8 * 8 outputs, 1 * 3 * 3 MACs each.
    assert stem == ir.LayerInfo(
        kind="conv2d", in_channels=1, out_channels=8, weight_shape=(8, 1, 3, 3),
        input_shape=(1, 8, 8), output_shape=(8, 8, 8), macs=4608,
        kernel_size=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), groups=1, has_bias=False,
        dilation=(1, 1), padding_mode="zeros",
    )
    # First block of stage 2: Conv2d(8, 16, 3, stride=2, padding=1) on 8x8 -> 16x4x4.
    down = ir.get(nodes["stages_3_conv1"], ir.LAYER, ir.LayerInfo)
    assert (down.input_shape, down.output_shape, down.macs) == ((8, 8, 8), (16, 4, 4), 16 * 4 * 4 * 8 * 9)
    shortcut = ir.get(nodes["stages_3_shortcut_0"], ir.LAYER, ir.LayerInfo)
    assert (shortcut.kernel_size, shortcut.macs) == ((1, 1), 16 * 4 * 4 * 8)
    fc = ir.get(nodes["fc"], ir.LAYER, ir.LayerInfo)
    assert (fc.kind, fc.in_channels, fc.out_channels, fc.macs, fc.has_bias) == ("linear", 32, 10, 320, True)
    assert (fc.input_shape, fc.output_shape, fc.params) == ((32,), (10,), 330)


def test_layer_records_hand_checked_grouped() -> None:
    gm = trace(_small("conv1d_net"), (_input("conv1d_net"),))
    nodes = {n.name: n for n in gm.graph.nodes}
    grouped = ir.get(nodes["features_1_0"], ir.LAYER, ir.LayerInfo)
    # Conv1d(8, 16, 3, stride=2, padding=1, groups=4) on length 64 -> 16 x 32; 2 * 3 MACs each.
    assert (grouped.kind, grouped.groups, grouped.weight_shape) == ("conv1d", 4, (16, 2, 3))
    assert (grouped.input_shape, grouped.output_shape, grouped.macs) == ((8, 64), (16, 32), 16 * 32 * 6)
    gm = trace(_small("mobilenetv2"), (_input("mobilenetv2"),))
    depthwise = [ir.get(n, ir.LAYER, ir.LayerInfo) for n in ir.compute_layers(gm)]
    depthwise = [i for i in depthwise if i.groups > 1]
    assert depthwise
    for info in depthwise:
        assert info.groups == info.in_channels == info.out_channels
        assert info.macs == info.out_channels * info.output_shape[1] * info.output_shape[2] * 9


def test_tensor_meta_on_every_node() -> None:
    gm = trace(_small("plain_cnn"), (_input("plain_cnn"),))
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "tensor_meta" in node.meta, node.name


# --------------------------------------------------------------------------- the user's model


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]], list[int], bool]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    ids = [id(p) for p in model.parameters()]
    return state, types, ids, model.training


def test_compile_does_not_modify_the_model() -> None:
    torch.manual_seed(0)
    model = zoo.resnet20(in_channels=1, width=8).train()
    before = _snapshot(model)
    params_before = list(model.parameters())
    calib = torch.randn(32, 1, 8, 8)
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq", weight_bits=3, act_bits=3), calib_data=calib)
    state, types, ids, training = _snapshot(model)
    assert state.keys() == before[0].keys()
    for key in state:
        torch.testing.assert_close(state[key], before[0][key], rtol=0, atol=0)
    assert types == before[1]
    assert ids == before[2]
    assert all(p is q for p, q in zip(model.parameters(), params_before))
    assert training == before[3]
    assert not hasattr(model.stem[0], "weight_quant")
    # The compiled module owns its parameters: training it does not touch the model.
    compiled_params = {id(p) for p in compiled.module.parameters()}
    assert not compiled_params & set(before[2])
    with torch.no_grad():
        for p in compiled.module.parameters():
            p.add_(1.0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[0][key], rtol=0, atol=0)


def test_trace_does_not_modify_the_model() -> None:
    model = _small("mobilenetv2").train()
    before = _snapshot(model)
    trace(model, (_input("mobilenetv2"),))
    after = _snapshot(model)
    assert after[1:] == before[1:]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())


# --------------------------------------------------------------------------- errors


def test_untraceable_submodule_names_path_and_leaf() -> None:
    with pytest.raises(TraceError) as info:
        trace(GatedNet(), (torch.randn(2, 1, 8, 8),))
    message = str(info.value)
    assert "\n" not in message
    assert "'body.1'" in message and "Gate" in message
    assert "--leaf untraceable_helpers:Gate" in message


def test_untraceable_compile_raises_trace_error() -> None:
    with pytest.raises(TraceError, match="body.1"):
        qcompiler.compile(GatedNet(), calib_data=torch.randn(8, 1, 8, 8))


def test_untraceable_root_module() -> None:
    with pytest.raises(TraceError) as info:
        trace(RootBranch(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "\n" not in message and "RootBranch" in message and "--leaf" in message


def test_leaf_module_makes_it_compile() -> None:
    torch.manual_seed(0)
    model = GatedNet().eval()
    calib = torch.randn(16, 1, 8, 8)
    spec = qcompiler.QuantSpec(passes="lsq", leaf_modules=["untraceable_helpers:Gate"])
    assert spec.leaf_modules == ("untraceable_helpers:Gate",)
    compiled = qcompiler.compile(model, spec, calib_data=calib)
    leaves = [n for n in compiled.module.graph.nodes if n.op == "call_module" and n.target == "body.1"]
    assert len(leaves) == 1
    assert isinstance(compiled.module.get_submodule("body.1"), Gate)
    assert [r.name for r in compiled.report.layers] == ["conv", "fc"]
    # Both layers are pinned at 8 bits, so the quantized model is close to the float one.
    with torch.no_grad():
        torch.testing.assert_close(compiled(calib), model(calib), atol=0.1, rtol=0.1)


def test_leaf_trace_keeps_eager_numerics() -> None:
    model = GatedNet().eval()
    x = torch.randn(3, 1, 8, 8)
    gm = trace(model, (x,), leaf_modules=["untraceable_helpers:Gate"])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        torch.testing.assert_close(gm(-x), model(-x))


@pytest.mark.parametrize("name", ["untraceable_helpers", "untraceable_helpers:Nope", "no_such_module:Gate", ":Gate"])
def test_bad_leaf_name(name: str) -> None:
    with pytest.raises(SpecError, match="cannot be imported"):
        trace(GatedNet(), (torch.randn(2, 1, 8, 8),), leaf_modules=[name])


@pytest.mark.parametrize(
    "name, shape",
    [("resnet20", (2, 3, 8, 8)), ("resnet20", (2, 1, 8)), ("conv1d_net", (2, 1, 8, 8)), ("plain_cnn", (2, 2, 8, 8))],
)
def test_wrong_input_shape_raises_data_error(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(DataError) as info:
        trace(_small(name), (torch.randn(*shape),))
    message = str(info.value)
    assert "\n" not in message
    assert str(shape) in message


def test_wrong_input_shape_prints_nothing_and_names_the_cause(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError) as info:
        trace(_small("resnet20"), (torch.randn(2, 3, 8, 8),))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert "channels" in str(info.value) and "ShapeProp" not in str(info.value)


def test_wrong_input_shape_through_compile() -> None:
    with pytest.raises(DataError, match="does not fit the model"):
        qcompiler.compile(_small("resnet20"), calib_data=torch.randn(4, 3, 8, 8))


def test_wrong_number_of_inputs() -> None:
    with pytest.raises(DataError, match="1 input"):
        trace(_small("plain_cnn"), (torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)))


def test_not_a_module() -> None:
    with pytest.raises(TraceError, match="nn.Module"):
        trace(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]


def test_bare_layer_model_is_a_compute_layer() -> None:
    gm = trace(nn.Linear(4, 2), (torch.randn(2, 4),))
    assert len(ir.compute_layers(gm)) == 1


def test_traced_annotated_model_pickles() -> None:
    import io

    buf = io.BytesIO()
    torch.save(trace(_small("resnet20"), (_input("resnet20"),)), buf)


def test_traced_model_round_trips_through_torch_save() -> None:
    import io

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=x)
    buf = io.BytesIO()
    torch.save(compiled.module, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compiled.module(x))


def test_layer_records_resolve_same_padding_and_dilation() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, kernel_size=4, padding="same", dilation=2))
    gm = trace(model, (torch.randn(1, 1, 9, 9),))
    info = ir.get(next(n for n in gm.graph.nodes if ir.LAYER in n.meta), ir.LAYER, ir.LayerInfo)
    # dilation 2, kernel 4: total padding 6 per dim, 3 before and 3 after
    assert (info.padding, info.dilation, info.padding_mode) == ((3, 3, 3, 3), (2, 2), "zeros")
    odd = trace(nn.Conv1d(1, 1, kernel_size=2, padding="same"), (torch.randn(1, 1, 5),))
    assert ir.compute_layers(odd)[0].meta[ir.LAYER].padding == (0, 1)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_a_non_zero_padding_mode_becomes_an_explicit_pad(mode, padding) -> None:
    """What torch computes for such a conv: ``F.pad`` in that mode, then the conv unpadded; the
    traced copy computes the same, the user's model keeps its padding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=padding, padding_mode=mode)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # one conv called twice: both sites padded
    x = torch.randn(2, 3, 7, 6)
    gm = trace(model, (x,))
    pads = [n for n in gm.graph.nodes if n.target is torch.nn.functional.pad]
    assert len(pads) == 2 and all(n.kwargs["mode"] == mode for n in pads)
    assert all(ir.get(n, ir.LAYER, ir.LayerInfo).padding == (0, 0, 0, 0) for n in ir.compute_layers(gm))
    assert torch.equal(gm(x), model(x))
    assert conv.padding_mode == mode and conv.padding == ((1, 1) if padding == 1 else padding)


class _KeepsForward(nn.Conv2d):
    """A subclass adding a method only."""

    def describe(self) -> str:
        return "mine"


class _Pads(nn.Conv2d):
    """A timm-style 'same' conv: pads in forward, so it is not a plain conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_a_subclass_keeping_forward_is_a_layer_of_its_base_and_an_overriding_one_a_float_leaf() -> None:
    model = nn.Sequential(_KeepsForward(1, 2, 3), nn.ReLU(), _Pads(2, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    gm = trace(model, (torch.randn(2, 1, 6, 6),))
    assert [(n.name, ir.get(n, ir.LAYER, ir.LayerInfo).kind) for n in ir.compute_layers(gm)] == [("_0", "conv2d"), ("_4", "linear")]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3", "4"]  # _Pads stays whole


def test_transposed_conv_records_hand_checked() -> None:
    # ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2) on 5 x 5 -> 6 x 10 x 10
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2))
    info = ir.get(ir.compute_layers(trace(model, (torch.randn(2, 4, 5, 5),)))[0], ir.LAYER, ir.LayerInfo)
    assert (info.kind, info.in_channels, info.out_channels, info.weight_shape) == ("conv_transpose2d", 4, 6, (4, 3, 3, 3))
    assert (info.output_shape, info.padding, info.output_padding, info.groups) == ((6, 10, 10), (1, 1, 1, 1), (1, 1), 2)
    assert info.macs == 4 * 5 * 5 * 3 * 9  # each input element scatters to out/groups * 3 * 3 outputs
    assert info.params == 4 * 3 * 9 + 6


def test_embedding_record() -> None:
    gm = trace(nn.Sequential(nn.Embedding(10, 4), nn.Flatten()), (torch.randint(0, 10, (2, 3)),))
    info = ir.get(ir.compute_layers(gm)[0], ir.LAYER, ir.LayerInfo)
    assert (info.kind, info.in_channels, info.out_channels, info.weight_shape, info.macs) == ("embedding", 10, 4, (10, 4), 0)


def test_single_operand_concat_is_dropped_and_leaves_nothing_in_float() -> None:
    """A dense block's first ``torch.cat([x])`` is ``x``: no float region, no join, no concat node."""
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.bn, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            x = self.c1(x)
            y = torch.relu(self.bn(torch.cat([x], 1)))
            return self.fc(torch.cat([x, self.c2(y)], 1).mean((2, 3)))

    torch.manual_seed(0)
    model = Dense().eval()
    x = torch.randn(32, 1, 8, 8)
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=x)
    cats = [n for n in c.module.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 1 and len(cats[0].args[0]) == 2
    assert not [n.name for n in c.module.graph.nodes if ir.FLOAT in n.meta]
    with torch.no_grad():
        assert torch.allclose(c.module(x), model(x), rtol=0.1, atol=0.1)


def test_leaf_modules_on_an_already_traced_graph_module_is_an_error() -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(SpecError, match=r"leaf_modules \['torch.nn.ReLU'\] cannot apply .*GraphModule") as e:
        trace(gm, (torch.randn(1, 1, 6, 6),), ["torch.nn.ReLU"])
    assert "\n" not in str(e.value)
    assert trace(gm, (torch.randn(1, 1, 6, 6),)) is not gm  # without leaf_modules: taken as traced, copied
