"""The post and pot passes: power-grid weights with integer codes in the IR."""

import math

import pytest
import torch

import qcompiler
from qcompiler import ir
from qcompiler.errors import PipelineError
from qcompiler.passes import REGISTRY, PassContext
from qcompiler.quantizers.power_grid import PowerGridQuantizer
from small_models import small_cnn


@pytest.mark.parametrize("grid", ["post", "pot"])
def test_power_grid_replaces_uniform_weights_except_pinned(grid):
    calib = torch.randn(8, 1, 6, 6)
    c = qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes=f"lsq,{grid}", weight_bits=4), calib_data=calib)
    nodes = {n.name: n for n in c.module.graph.nodes}
    middle = nodes["_2"]
    assert ir.get(middle, ir.WEIGHT, ir.WeightQuant).grid == grid
    assert isinstance(c.module.get_submodule("2").weight_quant, PowerGridQuantizer)
    for pinned in ("_0", "_5"):
        assert ir.get(nodes[pinned], ir.WEIGHT, ir.WeightQuant).grid == "uniform"
        assert ir.get(nodes[pinned], ir.CODES, ir.WeightCodes).grid == "uniform"


@pytest.mark.parametrize("init", ["mse", "percentile", "lsq", "max"])
def test_alpha_starts_as_the_spec_init_says_and_the_record_names_it(init):
    torch.manual_seed(0)
    calib = torch.randn(8, 1, 6, 6)
    model = small_cnn()
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq,post", weight_bits=4, init=init), calib_data=calib)
    middle = {n.name: n for n in c.module.graph.nodes}["_2"]
    assert ir.get(middle, ir.WEIGHT, ir.WeightQuant).init == init
    q = c.module.get_submodule("2").weight_quant
    w = model[2].weight.detach()
    top = w.abs().flatten(1).max(1).values
    if init == "max":
        torch.testing.assert_close(q.alpha.detach(), top)
    elif init == "lsq":  # the design's start: a 0.99 quantile of |W|
        torch.testing.assert_close(q.alpha.detach(), torch.quantile(w.abs().flatten(1), 0.99, dim=1))
    else:
        assert bool((q.alpha.detach() <= top * (1 + 1e-6)).all())


def test_codes_record_reproduces_the_weights():
    calib = torch.randn(8, 1, 6, 6)
    c = qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="asq,post", weight_bits=4), calib_data=calib)
    layer = next(n for n in c.module.graph.nodes if n.name == "_2")
    codes = ir.get(layer, ir.CODES, ir.WeightCodes)
    assert codes.grid == "post" and codes.base == pytest.approx(math.sqrt(2))
    assert codes.codes.abs().max() <= 7 and codes.codes.dtype == torch.int8  # stored as weights are
    # Rebuild every weight from (sign, exponent, scale) alone, as a backend would.
    mag = torch.where(codes.exponent >= 0, codes.base ** (-codes.exponent.double()), torch.zeros(()).double())
    rebuilt = codes.sign.double() * mag * codes.scale.double().view(-1, 1, 1, 1)
    module = c.module.get_submodule("2")
    torch.testing.assert_close(rebuilt.float(), module.weight_quant(module.weight).detach())


def test_codes_are_refreshed_after_training():
    calib = torch.randn(8, 1, 6, 6)
    c = qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="lsq,post"), calib_data=calib)
    layer = next(n for n in c.module.graph.nodes if n.name == "_2")
    before = ir.get(layer, ir.CODES, ir.WeightCodes).codes.clone()
    with torch.no_grad():
        c.module.get_submodule("2").weight.mul_(-1)
    c.freeze()
    assert torch.equal(ir.get(layer, ir.CODES, ir.WeightCodes).codes, -before)


def test_post_and_pot_conflict():
    with pytest.raises(PipelineError, match="'post' and 'pot'|'pot' and 'post'"):
        qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="lsq,post,pot"), calib_data=torch.randn(4, 1, 6, 6))


def test_second_run_changes_nothing():
    calib = torch.randn(8, 1, 6, 6)
    c = qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="lsq,post"), calib_data=calib)
    ctx = PassContext(spec=c.spec, example_inputs=(calib,), calib_batches=[calib])
    assert REGISTRY["post"]().run(c.module, ctx).modified is False
