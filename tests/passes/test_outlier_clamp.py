"""The outlier-clamp pass: each adder layer's input range as a quantile of |x| (docs/design.md §4.5, step 1)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.errors import PipelineError
from qcompiler.nn.adder import AdderConv2d
from qcompiler.passes import REGISTRY, PassContext
from qcompiler.passes.outlier_clamp import OutlierClamp, outlier_range

PROPERTY = settings(max_examples=80, deadline=None)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        AdderConv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        AdderConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 3),
    )
    # Give the batch norms non-trivial running statistics, as a trained model has.
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(32, 1, 6, 6))
    return m.eval()


def _reference_quantile(x: np.ndarray, alpha: float) -> float:
    a = np.sort(np.abs(x).ravel())
    return float(a[round(alpha * (a.size - 1))])


_ALPHAS = st.one_of(st.just(1.0), st.just(0.999), st.just(0.9992), st.floats(0.5, 1.0))


@PROPERTY
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=600),
    _ALPHAS,
)
def test_outlier_range_is_the_alpha_order_statistic_of_abs(values, alpha):
    x = np.array(values, dtype=np.float32)
    got = outlier_range(torch.from_numpy(x), alpha)
    assert got == _reference_quantile(x, alpha)
    if alpha == 1.0:
        assert got == float(np.abs(x).max())


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("alpha", [0.9985, 0.999, 0.9995, 1.0])
def test_outlier_range_on_multidimensional_tensors(n, alpha):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n)).view(n, 3, 1)
    assert outlier_range(x, alpha) == _reference_quantile(x.numpy(), alpha)


def test_outlier_range_docstring_and_max():
    x = torch.arange(-10.0, 11.0)
    assert outlier_range(x, 0.9) == 9.0
    assert outlier_range(x, 1.0) == 10.0


def _adder_nodes(gm):
    return [n for n in ir.compute_layers(gm) if ir.get(n, ir.LAYER, ir.LayerInfo).kind == "adder2d"]


def test_pass_records_running_max_of_per_batch_quantiles_on_every_adder_layer():
    model = _model()
    calib = torch.randn(150, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2
    alpha = 0.99
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="outlier-clamp", outlier_alpha=alpha), calib_data=calib)

    # By hand: 150 samples make batches of 64, 64, 22; each adder layer's input is
    # the float prefix of the model, in eval mode; batches combine by running max.
    batches = calib.split(64)
    assert len(batches) == 3
    with torch.no_grad():
        expected = {
            "_3": max(_reference_quantile(model[:3](b).numpy(), alpha) for b in batches),
            "_6": max(_reference_quantile(model[:6](b).numpy(), alpha) for b in batches),
        }
        per_batch = [_reference_quantile(model[:3](b).numpy(), alpha) for b in batches]
    assert len(set(per_batch)) > 1  # the running max actually picks among batches

    adders = _adder_nodes(c.module)
    assert [n.name for n in adders] == ["_3", "_6"]
    for node in adders:
        rec = ir.get(node, ir.ADDER_IN, ir.ClampRange)
        assert rec.alpha == alpha
        assert rec.batches == 3
        assert rec.range == pytest.approx(expected[node.name], rel=1e-6)
    # only adder layers get a clamp range
    for node in ir.compute_layers(c.module):
        if node not in adders:
            assert ir.ADDER_IN not in node.meta


def test_alpha_comes_from_the_spec_and_one_keeps_the_max():
    model = _model()
    calib = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    ranges = {}
    for alpha in (0.9, 0.9992, 1.0):
        spec = qcompiler.QuantSpec(passes="outlier-clamp", outlier_alpha=alpha)
        c = qcompiler.compile(model, spec, calib_data=calib)
        rec = ir.get(_adder_nodes(c.module)[0], ir.ADDER_IN, ir.ClampRange)
        assert rec.alpha == alpha
        ranges[alpha] = rec.range
    with torch.no_grad():
        observed_max = float(model[:3](calib).abs().max())
    assert ranges[1.0] == pytest.approx(observed_max, rel=1e-6)
    assert ranges[0.9] < ranges[0.9992] <= ranges[1.0]
    assert OutlierClamp.from_spec(qcompiler.QuantSpec(outlier_alpha=0.995)).alpha == 0.995


def test_needs_calibration_data():
    with pytest.raises(PipelineError, match="outlier-clamp.*calibration data"):
        qcompiler.compile(_model(), qcompiler.QuantSpec(passes="outlier-clamp"), example_inputs=torch.randn(1, 1, 6, 6))


def test_pass_leaves_the_graph_and_weights_alone():
    model = _model()
    calib = torch.randn(64, 1, 6, 6)
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="outlier-clamp"), calib_data=calib)
    assert type(c.module.get_submodule("3")) is AdderConv2d
    torch.testing.assert_close(c.module.get_submodule("3").weight, model[3].weight)
    with torch.no_grad():
        torch.testing.assert_close(c.module(calib), model(calib))


def test_second_run_reports_no_change_and_new_data_does():
    calib = torch.randn(96, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    spec = qcompiler.QuantSpec(passes="outlier-clamp", outlier_alpha=0.999)
    c = qcompiler.compile(_model(), spec, calib_data=calib)
    batches = list(calib.split(64))
    ctx = PassContext(spec=spec, example_inputs=(calib[:1],), calib_batches=batches)
    assert REGISTRY["outlier-clamp"].from_spec(spec).run(c.module, ctx).modified is False
    other = PassContext(spec=spec, example_inputs=(calib[:1],), calib_batches=[calib * 3])
    assert REGISTRY["outlier-clamp"].from_spec(spec).run(c.module, other).modified is True
