"""quantize-matmuls: both operands of every activation product on a grid, a matmul row, ONNX parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.analysis import ACC, GRID, tensor_domains
from qcompiler.errors import SpecError, UnsupportedError
from qcompiler.passes import REGISTRY, PassContext
from numeric_checks import relative_error


class Attention(nn.Module):
    """Single-head self-attention: ``q @ k^T`` (operator) and ``attn @ v`` (torch.bmm)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return self.o(torch.bmm(attn, v))


def _compile(bits: int = 8, passes: str = "lsq"):
    torch.manual_seed(1)
    x = torch.randn(64, 6, 16)
    spec = qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits)
    return qcompiler.compile(Attention().eval(), spec, calib_data=x), x


def test_both_operands_of_each_product_are_quantized_and_recorded() -> None:
    compiled, _ = _compile(bits=4)
    gm = compiled.module
    domains = tensor_domains(gm)
    products = [n for n in gm.graph.nodes if ir.MATMUL in n.meta]
    assert [n.name for n in products] == ["matmul", "bmm"]
    for node in products:
        rec = ir.get(node, ir.MATMUL, ir.MatMul)
        assert rec.inputs == tuple(a.name for a in node.args) and rec.bits == 4
        assert all(domains[a].kind == GRID and ir.get(a, ir.ACT, ir.ActQuant).bits == 4 for a in node.args)
        assert domains[node].kind == ACC and ir.FLOAT not in node.meta  # an integer product, not a float island
    # q and k^T are signed; the softmax output is not
    assert [ir.get(a, ir.ACT, ir.ActQuant).signed for a in products[1].args] == [False, True]
    rows = {r.name: r for r in compiled.report.layers}
    assert (rows["matmul"].kind, rows["matmul"].weight_bits, rows["matmul"].act_bits, rows["matmul"].params) == ("matmul", None, 4, 0)
    assert rows["bmm"].act_quantizer == "lsq unsigned x signed"
    assert rows["matmul"].macs == 6 * 6 * 16  # per sample: (6 x 16) @ (16 x 6)
    line = next(ln for ln in compiled.report.layer_table().splitlines() if ln.startswith("bmm "))
    assert line.split()[:4] == ["bmm", "matmul", "-", "4"]  # no weight: "-", not "fp32"


def test_quantize_matmuls_off_keeps_the_products_float_and_says_so() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 6, 16)
    spec = qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8, quantize_matmuls=False)
    from qcompiler.passes.manager import plan

    assert "quantize-matmuls" not in [p.name for p in plan(spec.passes, spec, {"calibration-data"}, REGISTRY)]
    gm = qcompiler.compile(Attention().eval(), spec, calib_data=x).module
    products = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in ("matmul", "bmm")]
    assert products and not [n.name for n in gm.graph.nodes if ir.MATMUL in n.meta]
    assert all(ir.FLOAT in n.meta for n in products)  # float regions, with their reason in the report
    with pytest.raises(SpecError, match="quantize_matmuls"):
        qcompiler.QuantSpec(passes="lsq", quantize_matmuls="no")


def test_second_run_changes_nothing() -> None:
    compiled, x = _compile()
    ctx = PassContext(spec=compiled.spec, example_inputs=(x[:1],), calib_batches=[x])
    n = len(compiled.module.graph.nodes)
    assert REGISTRY["quantize-matmuls"]().run(compiled.module, ctx).modified is False
    assert len(compiled.module.graph.nodes) == n


@pytest.mark.parametrize("passes", ["lsq", "asq"])
def test_8_bit_attention_is_close_to_float(passes: str) -> None:
    compiled, x = _compile(passes=passes)
    with torch.no_grad():
        assert relative_error(compiled(x), Attention().eval()(x)) < 0.02


def test_an_operand_read_twice_gets_one_quantizer() -> None:
    class Gram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            return h @ h.transpose(1, 2)

    compiled = qcompiler.compile(Gram(), qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(8, 3, 4))
    node = next(n for n in compiled.module.graph.nodes if ir.MATMUL in n.meta)
    assert node.args[0].name == "matmul_in0" and node.args[1].name == "matmul_in1"  # h and h^T are two tensors
    assert len(ir.act_quantizers(compiled.module)) == 3


def test_onnx_export_matches_and_the_integer_backend_refuses_in_one_line(tmp_path) -> None:
    compiled, x = _compile()
    path = compiled.export_onnx(tmp_path / "attn.onnx")
    parity = compiled.verify_onnx(path, x)
    assert parity.ok(), parity.text()
    import onnx

    ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    assert (ops["matmul"], ops["bmm"], ops["softmax"], ops["transpose"]) == ("MatMul", "MatMul", "Softmax", "Transpose")
    with pytest.raises(UnsupportedError) as info:
        compiled.lower()
    message = str(info.value)
    assert "\n" not in message and "%matmul" in message and "product of two activations" in message


def test_multihead_attention_products_are_quantized_and_export() -> None:
    """nn.MultiheadAttention, expanded by the front end into linear layers and tensor ops."""

    class MHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.attn, self.o = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.o(self.attn(x, x, x, need_weights=False)[0])

    model, x = MHA().eval(), torch.randn(32, 6, 16)
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8), calib_data=x)
    assert [r.kind for r in compiled.report.layers].count("matmul") == 2
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        parity = compiled.verify_onnx(compiled.export_onnx(Path(d) / "mha.onnx"), x)
    assert parity.ok(), parity.text()
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 0.02
