"""The IR verifier rejects hand-broken graphs with a message that names the node."""

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.errors import PipelineError
from qcompiler.passes.freeze import freeze
from qcompiler.verify import IRError, unrecorded_float, verify_graph
from small_models import small_cnn


def _compiled(passes="lsq"):
    return qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes=passes), calib_data=torch.randn(16, 1, 6, 6))


def test_a_compiled_graph_passes_every_rule():
    verify_graph(_compiled("asq,post").module, final=True)


def test_a_layer_reading_around_its_quantizer_is_named():
    gm = _compiled().module
    layer = next(n for n in gm.graph.nodes if n.name == "_2")
    q = layer.args[0]
    layer.replace_input_with(q, q.args[0])  # skip the quantizer
    with pytest.raises(IRError, match=r"%_2 .*reads no activation quantizer"):
        verify_graph(gm)


def test_a_non_finite_step_is_named():
    gm = _compiled().module
    gm.get_submodule("_2_act").step.data.fill_(float("inf"))
    with pytest.raises(IRError, match=r"%_2_act .*not positive and finite"):
        verify_graph(gm)


def test_a_record_that_disagrees_with_its_module_is_named():
    gm = _compiled().module
    gm.get_submodule("_2_act").bits = 3
    with pytest.raises(IRError, match=r"%_2_act .*record says 4-bit"):
        verify_graph(gm)


def test_an_unrecorded_float_op_is_named():
    gm = _compiled().module
    layer = next(n for n in gm.graph.nodes if n.name == "_2")
    with gm.graph.inserting_after(layer):
        sig = gm.graph.call_function(torch.sigmoid, (layer,))
    layer.replace_all_uses_with(sig, delete_user_cb=lambda u: u is not sig)
    gm.recompile()
    assert unrecorded_float(gm) == ["sigmoid", "_3", "_4"]  # up to the next quantizer
    with pytest.raises(IRError, match=r"no unrecorded float edge.*%sigmoid"):
        verify_graph(gm, final=True)
    freeze(gm)  # records why: sigmoid has no integer form here
    assert "has no integer form" in ir.get(sig, ir.FLOAT, ir.FloatRegion).reason
    verify_graph(gm, final=True)


def test_stale_frozen_records_are_caught_and_freeze_refreshes_them():
    c = _compiled("lsq,post")
    with torch.no_grad():
        c.module.get_submodule("2").weight.mul_(-1)
    with pytest.raises(IRError, match=r"%_2 .*qc.codes differs"):
        verify_graph(c.module, final=True)
    c.freeze()
    verify_graph(c.module, final=True)


def test_a_weight_grid_alone_is_refused_naming_the_activation_passes():
    with pytest.raises(PipelineError, match=r"'post' needs 'act-quant'.*'asq' or 'lsq'.*--passes lsq,post"):
        qcompiler.compile(small_cnn(), qcompiler.QuantSpec(passes="post"), calib_data=torch.randn(4, 1, 6, 6))
