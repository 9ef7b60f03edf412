"""Lowering coverage added for the zoo: reductions, permutes, indexing, adaptive pooling, the other zoo models.

Each case compiles a small model on digits, lowers it and checks agreement with the float64
fake-quant module at the issue's bar; what cannot be lowered raises one QCompileError line.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler.data import Dataset, load_digits
from qcompiler.errors import QCompileError
from qcompiler.zoo import ZOO
from small_models import FloatActivations


def agrees(model: nn.Module, passes: str = "lsq", bits: int = 4, data: Dataset | None = None):
    data = data or load_digits()
    torch.manual_seed(0)
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits), calib_data=data)
    program = c.lower()
    report = program.verify(c, data.x_test.numpy()[:200])
    assert report.ok(identical=0.999, max_diff=1, classes=0.995), report.text()
    return program


def agrees_in(fmt: str, model: nn.Module, passes: str = "lsq", outputs_to: float | None = 1e-4) -> None:
    """``model`` compiled on digits computes the same in ``fmt`` (the integer program or an ONNX form);
    the QDQ form, which onnxruntime fuses, on classes only."""
    from numeric_checks import assert_backends_agree

    data = load_digits()
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes=passes), calib_data=data)
    assert_backends_agree(c, data.x_test[:200], fmt, outputs_to=outputs_to if fmt == "custom" else None)


class Head(nn.Module):
    """conv-BN-ReLU, then ``tail`` (the op under test), then a linear classifier."""

    def __init__(self, tail, features: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.tail = tail
        self.fc = nn.Linear(features, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.tail(self.relu(self.bn(self.conv(x)))), 1))


class Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


class SumKeep(nn.Module):
    def forward(self, x):
        return torch.sum(x, dim=-1, keepdim=True)


class PermuteSlice(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)[:, 1:, ::2]


class ChannelMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


@pytest.mark.parametrize("tail,features,op", [
    (Mean(), 4, "sumpool"), (SumKeep(), 32, "sumpool"), (PermuteSlice(), 7 * 4 * 4, "permute"),
    (nn.AdaptiveAvgPool2d(3), 36, "sumpool"),  # 8 -> 3 does not divide: windows of 3 and 4
])
def test_reductions_permutes_indexing_and_adaptive_pooling_agree(tail, features, op):
    program = agrees(Head(tail, features))
    assert op in {i.op for i in program.instructions}


def test_asq_through_a_permute_agrees():
    agrees(Head(PermuteSlice(), 7 * 4 * 4), passes="asq")


def test_what_cannot_be_lowered_is_one_qcompile_error_line():
    data = load_digits()
    c = qcompiler.compile(Head(ChannelMean(), 64), qcompiler.QuantSpec(passes="lsq"), calib_data=data)
    with pytest.raises(QCompileError) as e:
        c.lower()
    message = str(e.value)
    assert "\n" not in message and "mean" in message and "channel" in message


@pytest.mark.parametrize("name,kwargs,passes,bits", [
    ("resnet18", {"width": 4, "in_channels": 1, "num_classes": 10}, "lsq", 4),  # max-pool stem, adaptive pool
    ("mobilenetv2", {"width_mult": 0.25, "in_channels": 1}, "lsq", 4),  # ReLU6, depthwise groups
    ("mobilenetv2", {"width_mult": 0.25, "in_channels": 1}, "asq,post", 8),
    ("conv1d_net", {"width": 4}, "lsq,pot", 8),  # 1-D, grouped
    ("conv1d_net", {"width": 4}, "asq", 4),
])
def test_other_zoo_models_agree(name, kwargs, passes, bits):
    data = load_digits()
    if name == "conv1d_net":  # each 8x8 image as 64 samples
        data = Dataset(data.x_train.reshape(-1, 1, 64), data.y_train, data.x_test.reshape(-1, 1, 64), data.y_test)
    agrees(ZOO[name](**kwargs), passes, bits, data)


def test_adder_layers_reading_an_asq_grid_agree():
    from qcompiler.zoo import adder_resnet20

    program = agrees(adder_resnet20(in_channels=1, width=4), "asq,outlier-clamp,adder-groups", 4)
    assert {"sad", "asq_beta"} <= {i.op for i in program.instructions}


class FlatMLP(nn.Module):
    """No convolution: the image is flattened (or permuted and sliced) before the first layer,
    so the input quantizer reads a layout change of the float network input."""

    def __init__(self, layout):
        super().__init__()
        torch.manual_seed(0)
        self.layout = layout
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(self.layout(x))))))


@pytest.mark.parametrize("layout,op", [
    (lambda x: x.flatten(1), "reshape"),
    (lambda x: x.permute(0, 1, 3, 2)[:, 0].flatten(1), "permute"),
], ids=["flatten", "permute-index-reshape"])
@pytest.mark.parametrize("passes", ["lsq", "asq"])
def test_layout_changes_of_the_float_input_before_its_quantizer_agree(layout, op, passes):
    program = agrees(FlatMLP(layout), passes=passes)
    ops = [i.op for i in program.instructions]
    assert op in ops and ops.index(op) < ops.index("quantize")  # on the float input, before it is quantized


class Pick(nn.Module):
    def forward(self, x):
        return x[:, -1, 1::2, 1:-1]


@pytest.mark.parametrize("make", [
    lambda: FlatMLP(lambda x: x.permute(0, 1, 3, 2)[:, 0].flatten(1)),  # on the float input
    lambda: Head(PermuteSlice(), 7 * 4 * 4),  # on codes: slices with a step
    lambda: Head(Pick(), 4 * 6),  # a negative integer, a step, a negative stop
], ids=["input", "permute-slice", "pick"])
@pytest.mark.parametrize("fmt", ["custom", "qdq"])
def test_indexing_and_layout_changes_agree_in_both_onnx_forms(make, fmt):
    agrees_in(fmt, make())


class ShuffleNet(nn.Module):
    """Reshapes whose target comes from ``x.size()``: a channel shuffle (ShuffleNet's, with
    ``n, c, h, w = x.size()`` and ``c // 2``) and the classic ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        x = torch.relu(self.conv2(x))
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
def test_reshapes_to_sizes_read_from_the_tensor_agree(fmt):
    agrees_in(fmt, ShuffleNet())


class FunctionalPool(nn.Module):
    """Global pooling as a function call, as torchvision's DenseNet writes it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x)))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1))


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
def test_global_pooling_called_as_a_function_agrees(fmt):
    agrees_in(fmt, FunctionalPool())


class CeilPool(nn.Module):
    """Max pooling with ``ceil_mode`` (SqueezeNet's and GoogLeNet's), on codes and on an accumulator."""

    def __init__(self, padding: int, side: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=padding, ceil_mode=True)
        self.fc = nn.Linear(8 * side * side, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


@pytest.mark.parametrize("padding,side", [(0, 4), (1, 5)])  # floor mode would give 3 and 4
def test_max_pooling_with_ceil_mode_agrees(padding, side):
    program = agrees(CeilPool(padding, side))
    assert "maxpool" in {i.op for i in program.instructions}


@pytest.mark.parametrize("smooth", [False, True], ids=["piecewise-linear", "smooth"])
@pytest.mark.parametrize("fmt", ["custom", "qdq"])
def test_float_activations_and_gates_export_to_onnx(smooth, fmt):
    """The piecewise-linear ones (hardswish, hardsigmoid, leaky ReLU) compute the module's bits;
    onnxruntime's sigmoid, tanh and GELU differ from torch's in the last bits, which can move a
    code downstream by one step, so there the classes must agree."""
    agrees_in(fmt, FloatActivations(smooth), outputs_to=None if smooth else 1e-4)


class TinyViT(nn.Module):
    """torchvision's ViT patterns: an assert on the input size, patches as tokens, pre-norm
    ``nn.LayerNorm`` (a float region) before an MLP with GELU, a residual, a mean over tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(1, 16, 2, stride=2)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        torch._assert(x.shape[-1] == 8, "Wrong image width!")
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16 tokens, 16 features)
        t = t + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(t))))
        return self.head(t.mean(1))


@pytest.mark.parametrize("fmt", ["custom", "qdq"])
def test_layer_norm_and_shape_asserts_export_to_onnx(fmt):
    """Both forms; in the QDQ one the linear layers on tokens are a MatMul on the dequantized weight."""
    agrees_in(fmt, TinyViT(), outputs_to=None)  # onnxruntime's layer norm and GELU round their own way


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: ``x.chunk(2, dim=1)``, one half through a branch, ``cat``, then the
    channel shuffle; and pieces of ``torch.split`` (uneven sections) and ``unbind``."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.branch, self.branch_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(8 * 64 if how != "unbind" else 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if self.how == "unbind":  # rows of the map as pieces
            rows = x.unbind(2)
            return self.fc(torch.flatten(rows[0] + rows[-1], 1))
        a, b = x.chunk(2, dim=1) if self.how == "chunk" else torch.split(x, [4, 4], dim=1)
        x = torch.cat((a, torch.relu(self.branch_bn(self.branch(b)))), dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("how", ["chunk", "split", "unbind"])
@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
def test_pieces_of_chunk_split_and_unbind_agree(how, fmt):
    agrees_in(fmt, ShuffleUnit(how))


class ClassToken(nn.Module):
    """Parameters the graph reads directly: a class token expanded per sample and concatenated
    to the patches, a position embedding added, ``F.layer_norm`` with its own weight and bias
    (ConvNeXt's), a learned layer scale multiplying an activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(1, 16, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, 16) * 0.1)
        self.norm_weight, self.norm_bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16) * 0.1)
        self.layer_scale = nn.Parameter(torch.full((16,), 0.5))
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos_embed
        h = torch.nn.functional.layer_norm(t, (16,), self.norm_weight, self.norm_bias, 1e-6)
        t = t + self.layer_scale * self.fc2(torch.relu(self.fc1(h)))
        return self.head(t[:, 0])


def test_parameters_read_by_the_graph_export_to_onnx():
    """The custom form computes them as the module does (float regions; the integer program refuses them)."""
    from numeric_checks import assert_backends_agree

    data = load_digits()
    c = qcompiler.compile(ClassToken(), qcompiler.QuantSpec(passes="lsq"), calib_data=data)
    for fmt in ("custom", "qdq"):
        assert_backends_agree(c, data.x_test[:200], fmt, outputs_to=None)  # onnxruntime's layer norm rounds its own way
    with pytest.raises(QCompileError, match="parameters read by the graph"):
        c.lower()


class ShapeSlice(nn.Module):
    """``x[:, :, : x.size(2) - 1]`` (a bound read from a shape, as transformers slice position ids)."""

    def __init__(self, start_from_shape: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.start_from_shape = start_from_shape
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 7 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x[:, :, x.size(2) - 7:] if self.start_from_shape else x[:, :, : x.size(2) - 1]
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("fmt", ["custom", "qdq"])
def test_a_slice_bound_read_from_a_shape_exports_or_is_one_line(fmt):
    agrees_in(fmt, ShapeSlice())
    data = load_digits()
    c = qcompiler.compile(ShapeSlice(start_from_shape=True), qcompiler.QuantSpec(passes="lsq"), calib_data=data)
    from qcompiler.runtime.onnx_export import to_onnx

    with pytest.raises(QCompileError, match="computed at run time"):
        to_onnx(c.module, fmt)
    with pytest.raises(QCompileError, match="computed at run time"):
        c.lower()


class RunTimeChunks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(4 * 64, 10)

    def forward(self, x):
        a, b = torch.relu(self.conv(x)).chunk(x.size(1) * 2, dim=1)  # the number of chunks read from a shape
        return self.fc((a + b).flatten(1))


def test_chunks_counted_at_run_time_are_one_line_in_both_backends():
    from qcompiler.runtime.onnx_export import to_onnx

    c = qcompiler.compile(RunTimeChunks(), qcompiler.QuantSpec(passes="lsq"), calib_data=load_digits())
    for backend in (lambda: to_onnx(c.module, "custom"), c.lower):
        with pytest.raises(QCompileError, match="sizes computed at run time") as e:
            backend()
        assert "\n" not in str(e.value)


class ShapeBuiltOffset(nn.Module):
    """conv-BN-ReLU, pooled, a classifier, plus a constant offset tensor built from the input's shape."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))
        return y + torch.ones(x.size())[:, 0, 0, :].sum(-1, keepdim=True) * 0.1  # (N, 1) of 0.8


@pytest.mark.parametrize("fmt", ["program", "custom"])
def test_tensors_built_from_shapes_are_constants_in_both_backends(fmt):
    """An offset built from the input's shape: the ONNX file's initializer, the integer program's sum offset."""
    agrees_in(fmt, ShapeBuiltOffset())


class TinyUNet(nn.Module):
    """Encoder, a stride-2 bottleneck, then ``up`` (the op under test) and a skip concatenation (a UNet)."""

    def __init__(self, up):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.down = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.up, self.dec = up, nn.Conv2d(10, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        skip = torch.relu(self.enc(x))
        y = self.up(torch.relu(self.down(skip)), skip)
        return self.fc(torch.relu(self.dec(torch.cat([skip, y], 1))).flatten(1))


class UpsampleModule(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, skip):
        return self.module(x)


class InterpolateToSkip(nn.Module):
    """``F.interpolate`` to the skip's size, read from its shape at run time (torchvision's FCN, FPNs)."""

    def forward(self, x, skip):
        return F.interpolate(x, size=skip.shape[-2:], mode="nearest")


UPSAMPLINGS = {
    "Upsample": lambda: UpsampleModule(nn.Upsample(scale_factor=2)),
    "UpsamplingNearest2d": lambda: UpsampleModule(nn.UpsamplingNearest2d(size=(8, 8))),
    "nearest-exact": lambda: UpsampleModule(nn.Upsample(scale_factor=2, mode="nearest-exact")),
    "interpolate-to-skip": InterpolateToSkip,
}


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
@pytest.mark.parametrize("up", sorted(UPSAMPLINGS))
def test_nearest_upsampling_in_a_unet_agrees(up, fmt):
    agrees_in(fmt, TinyUNet(UPSAMPLINGS[up]()))


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.factor)


@pytest.mark.parametrize("fmt", ["program", "custom"])
def test_nearest_upsampling_by_a_fraction_picks_torchs_positions(fmt):
    """8 -> 12: torch copies positions floor(i / 1.5), unevenly; both backends gather the same ones."""
    agrees_in(fmt, Head(Scale(1.5), 4 * 12 * 12), passes="asq")


def test_nearest_upsampling_is_a_gather_in_the_program():
    program = agrees(TinyUNet(UPSAMPLINGS["Upsample"]()))
    gathers = [i for i in program.instructions if i.op == "index" and any(isinstance(a, dict) for a in i.attrs["index"])]
    assert [a["positions"] for a in gathers[0].attrs["index"][1:]] == [[0, 0, 1, 1, 2, 2, 3, 3]] * 2


class InterpolateBilinearToSkip(nn.Module):
    def forward(self, x, skip):
        return F.interpolate(x, size=skip.shape[-2:], mode="bilinear")


INTERPOLATIONS = {
    "bilinear": lambda: UpsampleModule(nn.Upsample(scale_factor=2, mode="bilinear")),
    "bilinear-align-corners": lambda: UpsampleModule(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)),
    "bicubic": lambda: UpsampleModule(nn.Upsample(scale_factor=2, mode="bicubic")),
    "bilinear-to-skip": InterpolateBilinearToSkip,
}


@pytest.mark.parametrize("fmt", ["custom", "qdq"])
@pytest.mark.parametrize("up", sorted(INTERPOLATIONS))
def test_linear_and_cubic_upsampling_are_an_onnx_resize(up, fmt):
    """A float region: ``Resize`` sampling as torch does (checked: the other corner rule moves 6 % of classes)."""
    agrees_in(fmt, TinyUNet(INTERPOLATIONS[up]()))


@pytest.mark.parametrize("up", ["bilinear", "bilinear-align-corners", "bilinear-to-skip"])
@pytest.mark.parametrize("passes", ["lsq", "asq"])
def test_linear_upsampling_is_a_weighted_sum_of_gathers_in_the_program(up, passes):
    """Each corner's neighbours gathered (index with positions), weighed per position by the
    next requantization (torch's weights, analysis.linear_weights)."""
    program = agrees(TinyUNet(INTERPOLATIONS[up]()), passes=passes)
    gathers = [i for i in program.instructions if i.op == "index" and any(isinstance(a, dict) for a in i.attrs["index"])]
    assert len(gathers) == 4  # the four corners of one term


def test_bicubic_upsampling_is_one_line_in_the_program():
    c = qcompiler.compile(TinyUNet(INTERPOLATIONS["bicubic"]()), qcompiler.QuantSpec(passes="lsq"),
                          calib_data=load_digits())
    with pytest.raises(QCompileError) as e:
        c.lower()
    assert "\n" not in str(e.value) and "Upsample" in str(e.value)


def test_antialiased_upsampling_is_one_line_in_onnx():
    from qcompiler.runtime.onnx_export import to_onnx

    class Antialiased(nn.Module):
        def forward(self, x, skip):
            return F.interpolate(x, scale_factor=2, mode="bilinear", antialias=True)

    c = qcompiler.compile(TinyUNet(Antialiased()), qcompiler.QuantSpec(passes="lsq"), calib_data=load_digits())
    c.freeze()
    with pytest.raises(QCompileError) as e:
        to_onnx(c.module, "custom")
    assert "\n" not in str(e.value) and "antialias" in str(e.value)


class PadToSkip(nn.Module):
    """The classic UNet's up block: upsample (to 7x5 here, so the split is uneven), then pad to the
    skip's size with amounts computed from both shapes, ``F.pad(x1, [dx // 2, dx - dx // 2, ...])``."""

    def __init__(self, mode: str = "constant"):
        super().__init__()
        self.mode = mode

    def forward(self, x, skip):
        x1 = F.interpolate(x, size=(7, 5))
        diff_y, diff_x = skip.size()[2] - x1.size()[2], skip.size()[3] - x1.size()[3]
        return F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2], mode=self.mode)


class TransposedPadToSkip(PadToSkip):
    """milesial's UNet without bilinear upsampling: a transposed conv (4x4 to 7x7 here), then the
    pad to the skip's size."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(6, 6, 3, stride=2, padding=1)

    def forward(self, x, skip):
        x1 = self.up(x)
        diff_y, diff_x = skip.size()[2] - x1.size()[2], skip.size()[3] - x1.size()[3]
        return F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])


class UpThen(nn.Module):
    """Upsample to the skip's size, then ``pad`` (a padding module or function that keeps the size)."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x, skip):
        return self.pad(F.interpolate(x, scale_factor=2))


PADDINGS = {
    "pad-to-skip": PadToSkip,
    "transposed-conv-then-pad": TransposedPadToSkip,
    "reflect-to-skip": lambda: PadToSkip("reflect"),
    "replicate-to-skip": lambda: PadToSkip("replicate"),
    "ZeroPad2d": lambda: UpThen(nn.Sequential(nn.ZeroPad2d((2, 1, 0, 3)), nn.Identity(), CropTo8())),
    "ReflectionPad2d": lambda: UpThen(nn.Sequential(nn.ReflectionPad2d(1), CropTo8())),
    "crop-by-negative-pad": lambda: UpThen(PadCrop()),
}


class CropTo8(nn.Module):
    def forward(self, x):
        return x[:, :, :8, :8]


class PadCrop(nn.Module):
    """A negative amount crops: one column off the left, one zero column on the right."""

    def forward(self, x):
        return F.pad(x, (-1, 1))


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
@pytest.mark.parametrize("pad", sorted(PADDINGS))
def test_padding_in_a_unet_agrees(pad, fmt):
    """Zero, reflect and replicate padding copy codes (zero is on every grid): a gather per padded
    axis in the program (position -1 a zero), ``Pad`` and ``Gather`` in ONNX; amounts from shapes
    are evaluated on the recorded ones, and no node stays in float."""
    from qcompiler import ir

    c = qcompiler.compile(TinyUNet(PADDINGS[pad]()), qcompiler.QuantSpec(passes="lsq"), calib_data=load_digits())
    assert not [n.name for n in c.module.graph.nodes if ir.FLOAT in n.meta]
    agrees_in(fmt, TinyUNet(PADDINGS[pad]()))


class PaddingModeConvs(nn.Module):
    """Convs with ``padding_mode`` (the first reads the network input), traced as ``F.pad`` + the conv."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn = nn.Conv2d(1, 4, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, padding="same", padding_mode=mode)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.bn(self.a(x))))).flatten(1))


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_convs_with_a_padding_mode_agree(mode, fmt):
    agrees_in(fmt, PaddingModeConvs(mode))


def test_zero_padding_is_a_gather_with_zeros_in_the_program():
    program = agrees(TinyUNet(PadToSkip()), passes="asq")
    gathers = [i.attrs["index"] for i in program.instructions if i.op == "index" and i.attrs["index"][-1] != [None, None, None]]
    # 7 -> 8 rows: 0 before, 1 after; 5 -> 8 columns: 1 before, 2 after
    assert gathers[-1][1:] == [{"positions": [0, 1, 2, 3, 4, 5, 6, -1]}, {"positions": [-1, 0, 1, 2, 3, 4, -1, -1]}]


class OnePad(nn.Module):
    def forward(self, x, skip):
        return F.pad(F.interpolate(x, scale_factor=2), (0, 0, 0, 0), value=1.0)


class BatchPad(nn.Module):
    def forward(self, x, skip):
        return F.pad(F.interpolate(x, scale_factor=2), (0, 0, 0, x.size(0) - x.size(0)))


@pytest.mark.parametrize("fmt", ["program", "custom"])
@pytest.mark.parametrize("pad, why", [(OnePad, "pad"), (BatchPad, "reads the batch size")])
def test_padding_by_a_nonzero_constant_or_the_batch_size_is_one_line(pad, why, fmt):
    from qcompiler.runtime.onnx_export import to_onnx

    c = qcompiler.compile(TinyUNet(pad()), qcompiler.QuantSpec(passes="lsq"), calib_data=load_digits())
    with pytest.raises(QCompileError, match=why) as e:
        c.lower() if fmt == "program" else to_onnx(c.module, "custom")
    assert "\n" not in str(e.value)


class EndsIn(nn.Module):
    """Head's classifier, then ``tail`` on its logits (the function the network ends in)."""

    def __init__(self, tail):
        super().__init__()
        self.net, self.tail = Head(nn.Identity(), 4 * 8 * 8), tail

    def forward(self, x):
        return self.tail(self.net(x))


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


OUTPUT_ACTIVATIONS = {
    "Softmax": (lambda: nn.Softmax(dim=1), "softmax"),
    "LogSoftmax": (lambda: nn.LogSoftmax(dim=-1), "log_softmax"),
    "Sigmoid": (nn.Sigmoid, "sigmoid"),
    "Tanh": (nn.Tanh, "tanh"),
    "F.softmax": (lambda: Call(lambda y: F.softmax(y, dim=-1)), "softmax"),
    "log_softmax-method": (lambda: Call(lambda y: y.log_softmax(1)), "log_softmax"),
    "torch.sigmoid": (lambda: Call(torch.sigmoid), "sigmoid"),
}


@pytest.mark.parametrize("passes", ["lsq", "asq"])
@pytest.mark.parametrize("tail", sorted(OUTPUT_ACTIVATIONS))
def test_a_network_ending_in_softmax_sigmoid_or_tanh_runs_it_on_the_host(tail, passes):
    """The program dequantizes the logits and applies the function in float64 (an ``activation``
    host instruction): the outputs are the module's (float64) within rounding."""
    make, function = OUTPUT_ACTIVATIONS[tail]
    program = agrees(EndsIn(make()), passes=passes)
    assert [i.op for i in program.instructions][-2:] == ["dequant", "activation"]
    assert program.instructions[-1].attrs["function"] == function
    probabilities = program.run(load_digits().x_test[:5].numpy())
    if function == "softmax":
        assert np.allclose(probabilities.sum(1), 1.0)


@pytest.mark.parametrize("tail", [lambda: nn.Softmax(), lambda: Call(lambda y: torch.sigmoid(y) * 2)])
def test_other_float_tails_stay_one_line(tail):
    """A softmax whose axis is implicit, or anything after the function, is still a float region."""
    c = qcompiler.compile(EndsIn(tail()), qcompiler.QuantSpec(passes="lsq"), calib_data=load_digits())
    with pytest.raises(QCompileError, match="float") as e:
        c.lower()
    assert "\n" not in str(e.value)


class DictOutput(nn.Module):
    """Returns ``{"out": logits}`` (torchvision's segmentation models), plus ``aux`` when asked."""

    def __init__(self, aux: bool = False):
        super().__init__()
        self.net, self.aux = Head(nn.Identity(), 4 * 8 * 8), aux

    def forward(self, x):
        logits = self.net(x)
        return {"out": logits, "aux": logits * 2 if self.aux else None}


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
def test_a_dict_holding_one_tensor_is_the_output(fmt):
    agrees_in(fmt, DictOutput())


@pytest.mark.parametrize("fmt", ["program", "custom"])
def test_several_outputs_are_one_line(fmt):
    from qcompiler.runtime.onnx_export import to_onnx

    c = qcompiler.compile(DictOutput(aux=True), qcompiler.QuantSpec(passes="lsq"), calib_data=load_digits())
    c.freeze()
    with pytest.raises(QCompileError) as e:
        c.lower() if fmt == "program" else to_onnx(c.module, fmt)
    assert "\n" not in str(e.value) and "returns 2 tensors" in str(e.value)


class ScaleFromShape(nn.Module):
    def forward(self, x, skip):
        return F.interpolate(x, scale_factor=skip.shape[-1] / x.shape[-1])


@pytest.mark.parametrize("fmt", ["program", "custom"])
def test_a_nearest_upsampling_by_a_run_time_factor_is_one_line(fmt):
    from qcompiler.runtime.onnx_export import to_onnx

    c = qcompiler.compile(TinyUNet(ScaleFromShape()), qcompiler.QuantSpec(passes="lsq"), calib_data=load_digits())
    c.freeze()
    with pytest.raises(QCompileError) as e:
        c.lower() if fmt == "program" else to_onnx(c.module, fmt)
    assert "\n" not in str(e.value) and "computed at run time" in str(e.value)


class SegmentationHead(nn.Module):
    """A per-pixel classifier: conv features, then a 1x1 conv to 3 classes, bilinearly upsampled back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features, self.classes = nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return {"out": F.interpolate(self.classes(torch.relu(self.features(x))), size=x.shape[-2:], mode="bilinear")}


def test_classes_of_a_segmentation_map_are_its_channels():
    """A map (N, C, H, W) agrees on its per-pixel classes (argmax over C), a classifier on its last axis."""
    from qcompiler.analysis import class_axis
    from qcompiler.runtime.onnx_export import onnx_parity, to_onnx

    data = load_digits()
    seg = qcompiler.compile(SegmentationHead(), qcompiler.QuantSpec(passes="lsq"), calib_data=data)
    head = qcompiler.compile(Head(nn.Identity(), 4 * 8 * 8), qcompiler.QuantSpec(passes="lsq"), calib_data=data)
    assert class_axis(seg.module) == 1 and class_axis(head.module) == -1
    seg.freeze()
    x = data.x_test[:100]
    report = seg.lower().verify(seg, x.numpy())
    parity = onnx_parity(seg, to_onnx(seg.module, "custom"), x)
    assert report.ok() and parity.classes_agree == report.classes_agree == 1.0, report.text()


class Video(nn.Module):
    """3-D convolutions (video models: torchvision's R3D, MC3, R(2+1)D; a 3-D UNet's decoder): each
    8x8 digit read as a 4x4x4 volume, Conv3d-BN3d-ReLU, 3-D max pooling, a residual block, a
    functional ``F.conv3d`` and 3-D average pooling, a ``ConvTranspose3d`` upsampling, global
    average pooling, a linear classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU())
        self.pool = nn.MaxPool3d(2, stride=1, padding=1)
        self.conv, self.bn = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(8)
        self.temporal = nn.Parameter(torch.randn(8, 8, 3, 1, 1) * 0.2)
        self.up = nn.ConvTranspose3d(8, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), output_padding=(0, 1, 1))
        self.head, self.fc = nn.AdaptiveAvgPool3d(1), nn.Linear(6, 10)

    def forward(self, x):
        x = self.pool(self.stem(x.reshape(x.size(0), 1, 4, 4, 4)))
        x = torch.relu(self.bn(self.conv(x)) + x)
        x = F.avg_pool3d(torch.relu(F.conv3d(x, self.temporal, padding=(1, 0, 0))), 2, stride=1)
        return self.fc(torch.flatten(self.head(torch.relu(self.up(x))), 1))


@pytest.mark.parametrize("fmt,passes", [("program", "lsq"), ("custom", "lsq"), ("qdq", "lsq"),
                                        ("program", "asq,post"), ("custom", "asq,post")])
def test_3d_convolutions_are_quantized_and_agree(fmt, passes):
    data = load_digits()
    c = qcompiler.compile(Video(), qcompiler.QuantSpec(passes=passes), calib_data=data)
    assert not c.report.float_regions  # every Conv3d a quantized layer, none left in float
    agrees_in(fmt, Video(), passes)


def test_3d_convolutions_train():
    data = load_digits()
    c = qcompiler.compile(Video(), qcompiler.QuantSpec(passes="asq,post"), calib_data=data)
    layers = [m for m in c.module.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert len(layers) == 4 and all(hasattr(m, "weight_quant") for m in layers)
    c.module.train()
    F.cross_entropy(c.module(data.x_train[:32]), data.y_train[:32]).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)
