"""bias-correction: each quantized layer's output mean moved back to float's, carried by every backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.errors import SpecError
from qcompiler.passes import REGISTRY, PassContext
from qcompiler.passes.manager import plan
from numeric_checks import relative_error

CALIB = {"calibration-data"}


class ConvBnNet(nn.Module):
    """conv (no bias) -> batch norm -> ReLU -> conv (bias) -> ReLU -> pool -> linear: both kinds of target."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.fc(torch.flatten(self.pool(y), 1))


def _data() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(128, 3, 8, 8).abs()  # non-negative inputs: a quantized ReLU's mean shift shows


def _compile(bias_correction: bool, bits: int = 4) -> qcompiler.Compiled:
    spec = qcompiler.QuantSpec(passes="lsq", weight_bits=bits, act_bits=bits, pin_first_last=False,
                               bias_correction=bias_correction)
    return qcompiler.compile(ConvBnNet().eval(), spec, calib_data=_data())


def _output_means(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel means of the batch norm's output and of c2's and fc's, the QAT formulas
    (grad mode: no batch norm is folded into c1's output there)."""
    sums = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: sums.__setitem__(name, o.detach().movedim(-1 if name == "fc" else 1, 0).flatten(1).mean(1)))
        for name in ("bn", "c2", "fc")]
    with torch.enable_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sums


def test_planned_by_default_before_freeze_and_only_with_data_and_weights() -> None:
    spec = qcompiler.QuantSpec(passes="lsq")
    names = [p.name for p in plan(spec.passes, spec, CALIB, REGISTRY)]
    assert names[-2:] == ["bias-correction", "freeze"]
    off = spec.replace(bias_correction=False)
    assert "bias-correction" not in [p.name for p in plan(off.passes, off, CALIB, REGISTRY)]
    adder = qcompiler.QuantSpec(passes="adder-shared")  # no uniform weight quantizers to correct
    assert "bias-correction" not in [p.name for p in plan(adder.passes, adder, CALIB, REGISTRY)]
    with pytest.raises(SpecError, match="bias_correction"):
        qcompiler.QuantSpec(bias_correction="yes")


def test_each_layer_records_where_its_shift_went() -> None:
    gm = _compile(True).module
    recs = {n.name: ir.get(n, ir.BIAS, ir.BiasCorrection) for n in gm.graph.nodes if ir.BIAS in n.meta}
    assert sorted(recs) == ["c1", "c2", "fc"]
    assert (recs["c1"].target, recs["c1"].batch_norm) == ("batch-norm", "bn")
    assert recs["c2"].target == recs["fc"].target == "bias"
    assert all(r.rms > 0 for r in recs.values())


def test_quantized_layer_means_match_float_after_correction() -> None:
    x = _data()
    want = _output_means(ConvBnNet().eval(), x)
    gaps = {}
    for bc in (False, True):
        got = _output_means(_compile(bc).module, x)
        gaps[bc] = {name: float((got[name] - want[name]).abs().max()) for name in want}
    for name in want:  # bn: c1's shift, carried by the batch norm's running mean
        assert gaps[True][name] < 0.25 * gaps[False][name] and gaps[True][name] < 0.02, (name, gaps)


def test_output_error_falls_and_float_parameters_elsewhere_stay() -> None:
    x = _data()
    model = ConvBnNet().eval()
    with torch.no_grad():
        y = model(x)
        errors = {bc: relative_error(_compile(bc).module(x), y) for bc in (False, True)}
    assert errors[True] < 0.8 * errors[False], errors
    # the model the user passed is not modified
    assert torch.equal(model.c2.bias, ConvBnNet().c2.bias)


def test_integer_program_and_onnx_carry_the_correction(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    compiled = _compile(True, bits=8)
    x = _data()
    report = compiled.lower().verify(compiled, x.numpy())
    assert report.ok(identical=0.999, max_diff=1, classes=0.99), report.text()
    path = compiled.export_onnx(tmp_path / "m.onnx")
    onnx_report = compiled.verify_onnx(path, x)
    assert onnx_report.ok(), onnx_report


def test_second_run_changes_nothing() -> None:
    compiled = _compile(True)
    x = _data()
    ctx = PassContext(spec=compiled.spec, example_inputs=(x[:1],), calib_batches=[x])
    bias = compiled.module.get_submodule("c2").bias.clone()
    assert REGISTRY["bias-correction"]().run(compiled.module, ctx).modified is False
    assert torch.equal(compiled.module.get_submodule("c2").bias, bias)


def test_a_memory_bound_measures_both_sides_on_fewer_batches(monkeypatch) -> None:
    """When all calibration batches' live activations would pass LOCKSTEP_BYTES, both the float and
    the quantized means come from the first batches that fit (here one), and the correction still
    moves each output mean towards float's."""
    from qcompiler.passes import bias_correction, calibrate

    seen = []
    monkeypatch.setattr(bias_correction, "LOCKSTEP_BYTES", 1)
    real = calibrate.Lockstep.__init__
    monkeypatch.setattr(calibrate.Lockstep, "__init__", lambda self, gm, batches: (seen.append(len(batches)), real(self, gm, batches))[1])
    spec = qcompiler.QuantSpec(passes="lsq", weight_bits=4, act_bits=4, pin_first_last=False, calib_batches=4)
    gm = qcompiler.compile(ConvBnNet().eval(), spec, calib_data=list(_data().split(32))).module
    assert seen == [1]
    assert sorted(n.name for n in gm.graph.nodes if ir.BIAS in n.meta) == ["c1", "c2", "fc"]
    x = _data()
    want = _output_means(ConvBnNet().eval(), x)
    off = _output_means(_compile(False).module, x)
    got = _output_means(gm, x)
    assert all(float((got[n] - want[n]).abs().max()) < float((off[n] - want[n]).abs().max()) for n in want)
