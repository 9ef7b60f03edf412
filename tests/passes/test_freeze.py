"""freeze: the records hold the module's current effective values, after QAT too."""

import torch

import qcompiler
from qcompiler import ir, numerics
from qcompiler.data import load_digits
from qcompiler.passes.freeze import freeze
from qcompiler.quantizers.asq import BETA_BOUND
from qcompiler.quantizers.uniform import positive
from qcompiler.train import TrainConfig, train
from qcompiler.verify import IRError, verify_graph
from qcompiler.zoo import resnet20


def _assert_records_equal_module_state(gm):
    for node in ir.act_quantizers(gm):
        q, frozen = gm.get_submodule(node.target), ir.get(node, ir.STEP, ir.FrozenAct)
        assert frozen.step == float(positive(q.step.detach())) and frozen.step > 0
        assert (frozen.bits, frozen.signed, frozen.qmin, frozen.qmax) == (q.bits, q.signed, q.qmin, q.qmax)
        if ir.get(node, ir.ACT, ir.ActQuant).method == "asq":
            assert frozen.adapter.beta_bound == BETA_BOUND
            for got, want in zip((frozen.adapter.fc1_weight, frozen.adapter.fc1_bias, frozen.adapter.fc2_weight, frozen.adapter.fc2_bias), q.adapter.weights()):
                assert torch.equal(got, want.detach())
    for layer in ir.compute_layers(gm):
        codes = ir.get(layer, ir.CODES, ir.WeightCodes)
        module = gm.get_submodule(layer.target)
        assert torch.equal(codes.codes.long(), module.weight_quant.codes(module.weight.detach()))
        assert codes.codes.dtype == (torch.int8 if codes.bits <= 8 else torch.int16)
        assert codes.qmin <= int(codes.codes.min()) and int(codes.codes.max()) <= codes.qmax
        if codes.grid == "post":
            assert codes.max_exponent == numerics.largest_exponent(codes.codes)
            assert (codes.post_mantissa, codes.post_shift) == (0xB504F3, 24)


def test_frozen_records_equal_module_state_after_qat():
    data = load_digits()
    c = qcompiler.compile(resnet20(in_channels=1, width=4), qcompiler.QuantSpec(passes="asq,post"), calib_data=data)
    _assert_records_equal_module_state(c.module)
    train(c.module, data, TrainConfig(epochs=1, lr=0.05))
    # Training moved the steps, adapters and weights: the records are stale and the verifier says so.
    try:
        verify_graph(c.module, final=True)
        raise AssertionError("stale records went unnoticed")
    except IRError as e:
        assert "differs" in str(e)
    c.freeze()
    _assert_records_equal_module_state(c.module)


def test_second_freeze_reports_no_change():
    c = qcompiler.compile(resnet20(in_channels=1, width=4), qcompiler.QuantSpec(passes="lsq,pot"), calib_data=torch.rand(16, 1, 8, 8))
    assert freeze(c.module) is False
    with torch.no_grad():
        c.module.get_submodule("fc_act").step.mul_(2)
    assert freeze(c.module) is True
