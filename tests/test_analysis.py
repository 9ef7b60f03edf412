"""Tests for qcompiler.analysis: first/last compute layers found from the graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcompiler import ir, zoo
from qcompiler.analysis import first_layers, last_layers, to_dot, to_networkx
from qcompiler.frontend import trace
from qcompiler.passes import PassContext
from qcompiler.passes.pin_first_last import PinFirstLast
from qcompiler.spec import QuantSpec
from small_models import SMALL_KWARGS


# The module that reads the input and the classifier, per zoo model, found by reading zoo.py.
EXPECTED_PINS: dict[str, tuple[str, str]] = {
    "resnet20": ("stem.0", "fc"),
    "adder_resnet20": ("stem.0", "fc"),
    "resnet18": ("stem.0", "fc"),
    "resnet50": ("stem.0", "fc"),
    "mobilenetv2": ("stem.0", "fc"),
    "plain_cnn": ("features.0.0", "fc"),
    "conv1d_net": ("features.0.0", "fc"),
}


def _trace(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return trace(model.eval(), (x,))


def _zoo_gm(name: str) -> fx.GraphModule:
    model = zoo.build(name, in_channels=1, num_classes=10, **SMALL_KWARGS[name])
    x = torch.randn(2, 1, 64) if name == "conv1d_net" else torch.randn(2, 1, 8, 8)
    return _trace(model, x)


def _pin(gm: fx.GraphModule) -> dict[str, ir.Pin]:
    ctx = PassContext(spec=QuantSpec(), example_inputs=())
    result = PinFirstLast(bits=8).run(gm, ctx)
    assert result.modified
    return {str(n.target): n.meta[ir.PIN] for n in gm.graph.nodes if ir.PIN in n.meta}


def _targets(gm: fx.GraphModule, names: list[str]) -> list[str]:
    nodes = {n.name: n for n in gm.graph.nodes}
    return [str(nodes[name].target) for name in names]


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_first_and_last_layers(name: str) -> None:
    gm = _zoo_gm(name)
    first, last = EXPECTED_PINS[name]
    assert _targets(gm, first_layers(gm)) == [first]
    assert _targets(gm, last_layers(gm)) == [last]
    pins = _pin(gm)
    assert set(pins) == {first, last}
    assert pins[first] == ir.Pin(bits=8, reason="reads the network input")
    assert pins[last] == ir.Pin(bits=8, reason="produces the network output")
    # By module identity: the pinned nodes call the stem conv and the classifier.
    stem = gm.get_submodule(first)
    assert isinstance(stem, (nn.Conv1d, nn.Conv2d)) and stem.in_channels == 1
    assert gm.get_submodule(last) is gm.fc and isinstance(gm.fc, nn.Linear)


class TwoStems(nn.Module):
    """Two convs read the input (one after a pool), joined by a concat; one classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.b = nn.Conv2d(1, 4, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.up(self.b(self.pool(x)))], dim=1)
        y = torch.relu(self.mid(y))
        return self.fc(y.mean(dim=(2, 3)))


def test_two_input_branches_both_pinned() -> None:
    gm = _trace(TwoStems(), torch.randn(2, 1, 8, 8))
    assert _targets(gm, first_layers(gm)) == ["a", "b"]
    assert _targets(gm, last_layers(gm)) == ["fc"]
    pins = _pin(gm)
    assert set(pins) == {"a", "b", "fc"}
    assert gm.get_submodule("a") is gm.a and gm.get_submodule("b") is gm.b


class TwoHeads(nn.Module):
    """Two classifiers whose outputs are added; the first layer also feeds a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.body = nn.Linear(6, 6)
        self.head1 = nn.Linear(6, 2)
        self.head2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.body(h)
        return self.head1(h) + self.head2(torch.tanh(h))


def test_two_heads_both_last() -> None:
    gm = _trace(TwoHeads(), torch.randn(2, 6))
    assert _targets(gm, first_layers(gm)) == ["stem"]
    assert _targets(gm, last_layers(gm)) == ["head1", "head2"]


class Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.only = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.only(torch.relu(x))


def test_single_layer_is_first_and_last() -> None:
    gm = _trace(Single(), torch.randn(2, 4))
    assert first_layers(gm) == last_layers(gm) == ["only"]
    pins = _pin(gm)
    assert pins == {"only": ir.Pin(bits=8, reason="reads the network input and produces the network output")}


class NoLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2


def test_model_without_layers() -> None:
    gm = _trace(NoLayers(), torch.randn(2, 4))
    assert first_layers(gm) == [] and last_layers(gm) == []
    ctx = PassContext(spec=QuantSpec(), example_inputs=())
    assert not PinFirstLast().run(gm, ctx).modified


def test_networkx_view_and_dot() -> None:
    gm = _trace(TwoStems(), torch.randn(2, 1, 8, 8))
    g = to_networkx(gm)
    assert set(g.nodes) == {n.name for n in gm.graph.nodes}
    assert g.has_edge("x", "a") and g.has_edge("x", "pool") and g.has_edge("fc", "output")
    assert g.nodes["a"]["op"] == "call_module"
    dot = to_dot(gm, lambda n: f'{n.name} "quoted"\nline2')
    assert dot.startswith('digraph "') and dot.rstrip().endswith("}")
    assert '\\"quoted\\"' in dot and '"x" -> "a";' in dot
    assert dot.count("->") == g.number_of_edges()


class MaskedScores(nn.Module):
    """Scores plus a mask built from the input's shape, as transformers builds its attention masks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (1.0 - torch.ones((x.size(0), 4))) * -1e9
        return self.fc(x) + mask


def test_a_mask_from_the_input_shape_is_a_constant_and_its_add_no_join() -> None:
    import qcompiler
    from qcompiler.analysis import ACC, CONST, tensor_domains

    compiled = qcompiler.compile(MaskedScores(), QuantSpec(passes="lsq"), calib_data=torch.randn(16, 4))
    gm = compiled.module
    domains = tensor_domains(gm)
    size = next(n for n in gm.graph.nodes if n.target == "size")
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert domains[size].kind == CONST and domains[add.args[1]].kind == CONST
    assert domains[add].kind == ACC and ir.JOIN not in add.meta  # an offset, not a join of two activations
    assert not [q for q in ir.act_quantizers(gm) if domains[q.args[0]].kind == CONST]  # -1e9 never on a grid
    assert compiled.report.joins == 0


class _ShapeBuilt(nn.Module):
    """A linear layer plus tensors built from the input's shape: one repeated per sample, and one per batch index."""

    def __init__(self, batch_dependent: bool = False):
        super().__init__()
        self.fc, self.batch_dependent = nn.Linear(4, 3), batch_dependent

    def forward(self, x):
        mask = torch.ones(x.size())[:, :3] * 2.0  # ones built from the input's shape, then sliced and scaled
        out = self.fc(x) + mask + torch.arange(3).float()
        if self.batch_dependent:  # each sample's own index
            out = out + torch.arange(x.size(0)).float()[:, None]
        return out


def test_shape_built_tensors_are_evaluated_per_sample_or_whole():
    from qcompiler.analysis import shape_built_tensors
    from qcompiler.frontend import trace

    gm = trace(_ShapeBuilt(), (torch.randn(5, 4),))
    built = {n.name: b for n, b in shape_built_tensors(gm).items()}
    # the read end only (torch.ones and the slice feed it); torch.arange(3) was made while tracing, an attribute
    assert set(built) == {"mul"}
    assert built["mul"].batched and torch.equal(built["mul"].value, torch.full((1, 3), 2.0))


def test_a_tensor_whose_values_follow_the_batch_size_is_refused_in_one_line():
    from qcompiler.analysis import shape_built_tensors
    from qcompiler.frontend import trace

    gm = trace(_ShapeBuilt(batch_dependent=True), (torch.randn(5, 4),))
    with pytest.raises(ValueError, match=r"^getitem_1 is built from the input's shape, but its values depend on the batch size$"):
        shape_built_tensors(gm)


def test_a_shape_built_tensor_that_fails_on_its_own_is_one_line():
    from qcompiler.analysis import shape_built_tensors

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):  # fine at the traced batch of 5, impossible at 1 or 2
            return self.fc(x) + torch.ones(x.size())[:, :3].reshape(5, 3)

    gm = trace(Net(), (torch.randn(5, 4),))
    with pytest.raises(ValueError, match=r"^reshape is built from the input's shape, but computing it from the shape alone failed \(shape '\[5, 3\]' is invalid"):
        shape_built_tensors(gm)


class Upsamplings(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bilinear = nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x, y):
        return (self.up(x), F.interpolate(x, scale_factor=1.5), F.interpolate(x, size=y.shape[2:]),
                F.interpolate(x, size=(5, 7), mode="nearest-exact"), self.bilinear(x))


def test_nearest_positions_gather_what_each_upsampling_copies():
    from torch.fx.passes.shape_prop import ShapeProp

    from qcompiler.analysis import nearest_positions, op_kind

    gm = fx.symbolic_trace(Upsamplings())
    x, y = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 6, 9)
    ShapeProp(gm).propagate(x, y)
    outputs = dict(zip(("up", "interpolate", "interpolate_1", "interpolate_2", "bilinear"), gm(x, y)))
    for name, expected in outputs.items():
        node = next(n for n in gm.graph.nodes if n.name == name)
        positions = nearest_positions(gm, node)
        if name == "bilinear":
            assert positions is None and op_kind(gm, node) == "affine"  # new values: see linear_weights
            continue
        rows, cols = (torch.tensor(p) for p in positions)
        assert op_kind(gm, node) == "keep" and torch.equal(x[:, :, rows][:, :, :, cols], expected), name


class LinearUpsamplings(nn.Module):
    def forward(self, x, y):
        return (F.interpolate(x, scale_factor=2, mode="bilinear"), F.interpolate(x, scale_factor=1.5, mode="bilinear"),
                F.interpolate(x, size=y.shape[2:], mode="bilinear", align_corners=True),
                F.interpolate(x, size=(7, 5), mode="bilinear"))


def test_linear_weights_rebuild_torchs_bilinear_interpolation():
    """Per axis two positions and weights; the products of the axes' weights over the four corners
    are torch's bilinear interpolation (float64), with and without align_corners, any scale."""
    from torch.fx.passes.shape_prop import ShapeProp

    from qcompiler.analysis import linear_weights, op_kind

    gm = fx.symbolic_trace(LinearUpsamplings())
    x, y = torch.randn(2, 3, 3, 4, dtype=torch.float64), torch.randn(2, 3, 6, 9, dtype=torch.float64)
    ShapeProp(gm).propagate(x, y)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.interpolate]
    for node, expected in zip(nodes, gm(x, y)):
        (rows_lo, rows_hi, w_rows_lo, w_rows_hi), (cols_lo, cols_hi, w_cols_lo, w_cols_hi) = linear_weights(gm, node)
        assert op_kind(gm, node) == "affine" and np.allclose(w_rows_lo + w_rows_hi, 1) and np.allclose(w_cols_lo + w_cols_hi, 1)
        rebuilt = sum(x[:, :, rows][:, :, :, cols] * torch.from_numpy(np.multiply.outer(wr, wc))
                      for rows, wr in ((rows_lo, w_rows_lo), (rows_hi, w_rows_hi))
                      for cols, wc in ((cols_lo, w_cols_lo), (cols_hi, w_cols_hi)))
        torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-12, msg=node.name)
