"""quantize-joins: one quantizer per tensor, every join on integer grids, records that say so."""

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.analysis import GRID, tensor_domains
from qcompiler.passes import REGISTRY, PassContext
from qcompiler.quantizers.init import choose_signed, fit_act_grid


class DownBlock(nn.Module):
    """A ResNet downsample block: conv1 and the 1x1 shortcut conv read the same tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.shortcut = nn.Conv2d(4, 8, 1, stride=2)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.relu2(self.bn1(self.conv1(x)) + self.shortcut(x))
        z = self.conv2(y) + y  # identity shortcut: y is read by conv2 and by the add
        return self.fc(torch.flatten(z, 1))


def _compile(**spec):
    calib = torch.randn(32, 1, 6, 6)
    return qcompiler.compile(DownBlock().eval(), qcompiler.QuantSpec(passes="lsq", weight_bits=4, act_bits=4, **spec), calib_data=calib)


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def test_two_layers_reading_one_tensor_share_one_quantizer():
    gm = _compile().module
    nodes = _nodes(gm)
    q = nodes["conv1"].args[0]
    assert ir.ACT in q.meta and nodes["shortcut"].args[0] is q  # same node, same step
    assert sum(1 for n in gm.graph.nodes if ir.ACT in n.meta and n.meta[ir.ACT].role == "input" and n.args[0] is q.args[0]) == 1


def test_join_operands_and_result_are_on_recorded_grids():
    gm = _compile().module
    domains = tensor_domains(gm)
    joins = [n for n in gm.graph.nodes if ir.JOIN in n.meta]
    assert len(joins) == 2
    for join in joins:
        rec = ir.get(join, ir.JOIN, ir.Join)
        assert rec.kind == "add" and rec.bits == 8
        operands = join.args[:2]
        assert tuple(domains[a].grid for a in operands) == rec.inputs
        assert all(domains[a].kind == GRID for a in operands)
        out = _nodes(gm)[rec.output]
        assert ir.get(out, ir.ACT, ir.ActQuant).bits == 8
    # The first add's result is taken after its ReLU (unsigned codes), and conv2 requantizes those 8-bit codes.
    first = ir.get(joins[0], ir.JOIN, ir.Join)
    out = _nodes(gm)[first.output]
    assert out.args[0].name == "relu2" and not ir.get(out, ir.ACT, ir.ActQuant).signed
    conv2_q = _nodes(gm)["conv2"].args[0]
    assert conv2_q.args[0] is out and ir.get(conv2_q, ir.ACT, ir.ActQuant).bits == 4
    # The identity shortcut reads the very same 8-bit codes.
    assert first.output in ir.get(joins[1], ir.JOIN, ir.Join).inputs


def test_residual_bits_sets_the_width_of_every_join_quantizer():
    gm = _compile(residual_bits=6).module
    widths = {n.meta[ir.ACT].bits for n in gm.graph.nodes if ir.ACT in n.meta and n.meta[ir.ACT].role == "join"}
    assert widths == {6}


def _join_quantizers(gm):
    return [(n, n.meta[ir.ACT], gm.get_submodule(n.target)) for n in gm.graph.nodes
            if ir.ACT in n.meta and n.meta[ir.ACT].role == "join"]


@pytest.mark.parametrize("init", ["lsq", "max"])
def test_join_quantizers_start_without_clipping_under_lsq_and_max(init):
    """LSQ's mean-based start is for layer inputs; joins then reach max|x| as they always did."""
    gm = _compile(init=init).module
    assert _join_quantizers(gm)
    for n, rec, q in _join_quantizers(gm):
        rng = ir.get(n.args[0], ir.RANGE, ir.TensorRange)
        assert rec.init == "max"
        top = max(abs(rng.min), abs(rng.max)) if q.signed else rng.max
        assert float(q.step.detach()) * q.qmax == pytest.approx(top, rel=1e-6)


def test_join_quantizers_follow_the_spec_init_by_default():
    gm = _compile().module
    for n, rec, q in _join_quantizers(gm):
        rng = ir.get(n.args[0], ir.RANGE, ir.TensorRange)
        assert rec.init == "mse" and rec.signed == q.signed == choose_signed(rng, 8)
        assert float(q.step.detach()) == pytest.approx(fit_act_grid(rng.hist, 8, q.signed).step, rel=1e-6)


def test_second_run_changes_nothing():
    compiled = _compile()
    ctx = PassContext(spec=compiled.spec, example_inputs=(torch.randn(1, 1, 6, 6),), calib_batches=[torch.randn(8, 1, 6, 6)])
    n_nodes = len(compiled.module.graph.nodes)
    assert REGISTRY["quantize-joins"].from_spec(compiled.spec).run(compiled.module, ctx).modified is False
    assert len(compiled.module.graph.nodes) == n_nodes


def test_without_join_quantization_the_joins_are_recorded_float_regions():
    gm = _compile(quantize_joins=False).module
    floats = {n.name: n.meta[ir.FLOAT].reason for n in gm.graph.nodes if ir.FLOAT in n.meta}
    assert "add" in floats and "quantize_joins is off" in floats["add"]
    assert not any(ir.JOIN in n.meta for n in gm.graph.nodes)


def test_8_bit_join_quantizers_add_little_error_to_the_layer_quantizers():
    model = DownBlock().eval()
    calib = torch.randn(64, 1, 6, 6)
    errors = {}
    for joins in (True, False):
        spec = qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8, pin_first_last=False, quantize_joins=joins)
        c = qcompiler.compile(model, spec, calib_data=calib)
        with torch.no_grad():
            ref, got = model(calib), c(calib)
        errors[joins] = float((got - ref).norm() / ref.norm())
    assert errors[True] < errors[False] + 0.02, errors
