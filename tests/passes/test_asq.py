"""The asq pass: ASQ input quantizers on non-pinned layers, LSQ on pinned ones."""

import torch

import qcompiler
from qcompiler import ir
from qcompiler.passes import REGISTRY, PassContext
from qcompiler.quantizers.asq import ASQQuantizer
from qcompiler.quantizers.uniform import UniformQuantizer
from small_models import small_cnn


def test_asq_structure_and_records():
    calib = torch.randn(16, 1, 6, 6)
    c = qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="asq", weight_bits=4, act_bits=3), calib_data=calib)
    gm = c.module
    acts = {layer.name: layer.args[0] for layer in ir.compute_layers(gm)}
    assert set(acts) == {"_0", "_2", "_5"}
    middle = acts["_2"].meta[ir.ACT]
    assert middle.method == "asq" and middle.bits == 3 and not middle.signed
    assert isinstance(gm.get_submodule(middle.module), ASQQuantizer)
    for pinned in ("_0", "_5"):  # first and last layers: 8-bit LSQ, no adapter
        rec = acts[pinned].meta[ir.ACT]
        assert rec.method == "lsq" and rec.bits == 8
        assert type(gm.get_submodule(rec.module)) is UniformQuantizer
    w = ir.get(next(n for n in gm.graph.nodes if n.name == "_2"), ir.WEIGHT, ir.WeightQuant)
    assert (w.grid, w.bits) == ("uniform", 4)


def test_asq_at_init_matches_lsq_closely():
    """beta ≈ 1 at init, so ASQ starts as the LSQ model."""
    calib = torch.rand(32, 1, 6, 6)
    m = small_cnn()
    lsq = qcompiler.compile(m, qcompiler.QuantSpec(passes="lsq"), calib_data=calib).module
    asq = qcompiler.compile(m, qcompiler.QuantSpec(passes="asq"), calib_data=calib).module
    x = calib[:8]
    torch.testing.assert_close(asq(x), lsq(x), atol=0.05 * lsq(x).abs().max().item(), rtol=0)


def test_second_run_changes_nothing():
    calib = torch.randn(8, 1, 6, 6)
    c = qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="asq"), calib_data=calib)
    ctx = PassContext(spec=c.spec, example_inputs=(calib,), calib_batches=[calib])
    assert REGISTRY["asq"]().run(c.module, ctx).modified is False


def test_asq_conflicts_with_lsq():
    import pytest

    from qcompiler.errors import PipelineError

    with pytest.raises(PipelineError, match="conflict"):
        qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="lsq,asq"), calib_data=torch.randn(4, 1, 6, 6))


class _TokenMLP(torch.nn.Module):
    """Linear layers on ``(B, T, C)`` tokens, T == C so a wrong pooling axis would not crash."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Conv1d(1, c, 8, stride=8)
        self.mlp1, self.mlp2, self.head = torch.nn.Linear(c, 2 * c), torch.nn.Linear(2 * c, c), torch.nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(1).unsqueeze(1)).transpose(1, 2)
        t = t + self.mlp2(torch.relu(self.mlp1(t)))
        return self.head(t.mean(1))


def test_asq_on_token_inputs_pools_over_tokens() -> None:
    import qcompiler
    from qcompiler.quantizers.asq import ASQQuantizer

    compiled = qcompiler.compile(_TokenMLP(), qcompiler.QuantSpec(passes="asq"), calib_data=torch.randn(16, 1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    assert compiled.module(x).shape == (3, 10)
    layers = {n.name: n for n in ir.compute_layers(compiled.module)}
    act = ir.input_act(layers["mlp1"])
    q = compiled.module.get_submodule(act.module)
    assert act.method == "asq" and isinstance(q, ASQQuantizer) and q.adapter.feature_axis == -1
    frozen = ir.get(layers["mlp1"].args[0], ir.STEP, ir.FrozenAct)
    assert frozen.adapter is not None and frozen.adapter.feature_axis == -1
