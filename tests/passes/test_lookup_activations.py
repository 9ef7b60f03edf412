"""lookup-activations: hardswish, SiLU, sigmoid, GELU ... on a grid, and the integer program's table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.analysis import ACC, tensor_domains
from qcompiler.errors import PipelineError, UnsupportedError
from qcompiler.runtime.agreement import verify_program
from qcompiler.runtime.cost import costs
from qcompiler.report import PRODUCT_KIND
from small_models import FloatActivations


class Block(nn.Module):
    """conv -> BN -> ``act`` -> conv -> BN -> SiLU (a function) -> pool -> linear -> sigmoid read out."""

    def __init__(self, act: nn.Module, readout: bool = False) -> None:
        super().__init__()
        self.c1, self.b1, self.act = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), act
        self.c2, self.b2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)
        self.readout = readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.b1(self.c1(x)))
        x = F.silu(self.b2(self.c2(x))).mean((2, 3))
        return self.fc(x).sigmoid() if self.readout else self.fc(x)


def _block(act: nn.Module, readout: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Block(act, readout)
    for bn in (model.b1, model.b2):  # statistics a trained network might have: shifted, scaled, both signs
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_(1.0, 0.3)
        bn.bias.data.normal_()
    return model.eval(), torch.randn(160, 1, 8, 8)


def _compile(model: nn.Module, x: torch.Tensor, passes: str, bits: int):
    spec = qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits)
    return qcompiler.compile(model, spec, calib_data=x[:64])


class Gelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class TanhMethod(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.tanh()


ACTIVATIONS = {
    "hardswish-inplace": lambda: nn.Hardswish(inplace=True),
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "gelu-tanh-function": Gelu,
    "tanh-method": TanhMethod,
    "leaky-relu": lambda: nn.LeakyReLU(0.1),
}


@pytest.mark.parametrize("passes,bits", [("lsq,lookup-activations", 8), ("lsq,lookup-activations", 4),
                                         ("asq,post,lookup-activations", 4)])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_the_program_computes_each_function_by_table_and_agrees_with_the_module(act, passes, bits) -> None:
    model, x = _block(ACTIVATIONS[act]())
    compiled = _compile(model, x, passes, bits)
    gm = compiled.module
    lookups = [n for n in gm.graph.nodes if ir.LOOKUP in n.meta]
    assert len(lookups) == 2  # the block's activation and the SiLU function
    domains = tensor_domains(gm)
    for node in lookups:
        rec = ir.get(node, ir.LOOKUP, ir.Lookup)
        assert node.args[0].name == rec.input and ir.get(node.args[0], ir.ACT, ir.ActQuant).method == "lsq"
        assert rec.bits == bits and domains[node].kind == ACC
    assert not any(ir.FLOAT in n.meta for n in gm.graph.nodes)
    program = compiled.lower()
    tables = [i for i in program.instructions if i.op == "lookup"]
    assert len(tables) == 2 and all(program.consts[i.consts[0]].size == 2**bits for i in tables)
    report = verify_program(program, compiled, x.numpy())
    assert report.ok(), report.text()
    assert costs(program, x.numpy()).counts["lut"] == 2 * 8 * 8 * 8  # two functions of 8x8x8 values per sample


def test_the_table_holds_the_function_at_every_code() -> None:
    model, x = _block(nn.Hardswish())
    compiled = _compile(model, x, "lsq,lookup-activations", 4)
    program = compiled.lower()
    ins = next(i for i in program.instructions if i.layer == "act")
    frozen = ir.get(compiled.module.graph.find_nodes(op="call_module", target="act_in0")[0], ir.STEP, ir.FrozenAct)
    codes = np.arange(frozen.qmin, frozen.qmax + 1)
    want = F.hardswish(torch.from_numpy(codes * frozen.step)).numpy()
    got = program.consts[ins.consts[0]] * 2.0 ** -ins.attrs["frac_bits"]
    assert np.abs(got - want).max() <= 2.0 ** -ins.attrs["frac_bits"] / 2
    assert np.abs(program.consts[ins.consts[0]]).max() < 2**31 and ins.attrs["qmin"] == frozen.qmin


def test_without_the_pass_the_program_refuses_and_names_the_pass() -> None:
    model, x = _block(nn.Hardswish())
    compiled = _compile(model, x, "lsq", 8)
    with pytest.raises(UnsupportedError) as info:
        compiled.lower()
    message = str(info.value)
    assert "\n" not in message and "module Hardswish" in message and "lookup-activations" in message


def test_the_pass_needs_activation_quantizers_before_it() -> None:
    model, x = _block(nn.Hardswish())
    with pytest.raises(PipelineError, match="needs 'act-quant'.*--passes lsq,lookup-activations"):
        _compile(model, x, "lookup-activations", 8)


def test_a_read_out_sigmoid_stays_on_the_host_and_in_place_modules_are_copied_out_of_place() -> None:
    model, x = _block(nn.Hardswish(inplace=True), readout=True)
    compiled = _compile(model, x, "lsq,lookup-activations", 8)
    tail = [n for n in compiled.module.graph.nodes if n.op == "call_method" and n.target == "sigmoid"]
    assert len(tail) == 1 and ir.LOOKUP not in tail[0].meta
    assert model.act.inplace and not compiled.module.get_submodule("act").inplace  # the user's model untouched
    program = compiled.lower()
    assert program.instructions[-1].op == "activation"
    report = verify_program(program, compiled, x.numpy())
    assert report.ok(), report.text()


def test_onnx_export_agrees_with_the_module(tmp_path) -> None:
    model, x = _block(nn.Hardswish())
    compiled = _compile(model, x, "lsq,lookup-activations", 8)
    parity = compiled.verify_onnx(compiled.export_onnx(tmp_path / "m.onnx"), x)
    assert parity.ok(), parity.text()


def test_the_ir_verifier_checks_the_lookup_record_against_the_graph() -> None:
    import dataclasses

    from qcompiler.verify import IRError, verify_graph

    model, x = _block(nn.Hardswish())
    gm = _compile(model, x, "lsq,lookup-activations", 8).module
    verify_graph(gm, final=True)
    node = next(n for n in gm.graph.nodes if ir.LOOKUP in n.meta)
    node.meta[ir.LOOKUP] = dataclasses.replace(node.meta[ir.LOOKUP], input="c2_act")
    with pytest.raises(IRError, match="lookup record matches the graph"):
        verify_graph(gm)


class Swish(nn.Module):
    """A swish written out, ``x * torch.sigmoid(x)``, and a gate read through a view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)
        self.gate = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        x = x * torch.sigmoid(x)
        g = torch.sigmoid(self.gate(x.mean((2, 3)))).view(-1, 8, 1, 1)
        return self.fc((x * g).mean((2, 3)))


@pytest.mark.parametrize("passes,bits", [("lsq,lookup-activations", 8), ("asq,post,lookup-activations", 4)])
@pytest.mark.parametrize("smooth", [False, True], ids=["piecewise-linear", "smooth"])
def test_squeeze_excitation_gates_and_every_function_lower_and_agree(smooth, passes, bits) -> None:
    """MobileNetV3's and EfficientNet's patterns (hardswish/SiLU, a hardsigmoid/sigmoid gate multiplied
    into the map, GELU, leaky ReLU, tanh): no float region is left, the program agrees code for code."""
    torch.manual_seed(0)
    model, x = FloatActivations(smooth).eval(), torch.randn(160, 1, 8, 8)
    compiled = _compile(model, x, passes, bits)
    gm = compiled.module
    gate = next(n for n in gm.graph.nodes if ir.MATMUL in n.meta)
    rec = ir.get(gate, ir.MATMUL, ir.MatMul)
    assert rec.elementwise and rec.inputs == tuple(a.name for a in gate.args)
    assert not any(ir.FLOAT in n.meta for n in gm.graph.nodes)
    assert [r.kind for r in compiled.report.layers].count(PRODUCT_KIND) == 1
    section = compiled.report.text().split("Functions computed by table (lookup-activations):\n")[1]
    functions = {n.name for n in gm.graph.nodes if ir.LOOKUP in n.meta}
    assert len(functions) == (4 if smooth else 5) and all(f"\n{name} " in section for name in functions)
    program = compiled.lower()
    assert [i.op for i in program.instructions].count("mul") == 1
    report = verify_program(program, compiled, x.numpy())
    assert report.ok(), report.text()
    assert costs(program, x.numpy()).counts[f"mult{8}"] >= 8 * 8 * 8  # the gate's multiplies among the layers'


def test_a_written_out_swish_and_a_viewed_gate_are_products_of_grids() -> None:
    torch.manual_seed(0)
    model, x = Swish().eval(), torch.randn(160, 1, 8, 8)
    compiled = _compile(model, x, "lsq,lookup-activations", 8)
    products = [n for n in compiled.module.graph.nodes if ir.MATMUL in n.meta]
    assert len(products) == 2
    swish = products[0]  # x * sigmoid(x): x read through the one quantizer the sigmoid's table reads too
    sigmoid = swish.args[1].args[0]  # the product's second operand is the quantized sigmoid
    assert ir.LOOKUP in sigmoid.meta and swish.args[0] is sigmoid.args[0]
    program = compiled.lower()
    report = verify_program(program, compiled, x.numpy())
    assert report.ok(), report.text()
