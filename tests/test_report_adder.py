"""adder_group_cost: the extra FLOPs of g scale groups (supplement, Prop. 2, eqs. (2)-(4))."""

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.nn.adder import AdderConv2d
from qcompiler.passes.adder_groups import adder_group_cost, group_cost_table


def _model():
    """Two adder layers: c=6 -> 6 (3x3, stride 1, 10x10) and c=6 -> 12 (3x3, stride 2, 10x10 -> 5x5)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        AdderConv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        AdderConv2d(6, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * 5 * 5, 3),
    )
    # distinct per-channel weight ranges so k-means fills all four groups
    for layer in (m[3], m[6]):
        with torch.no_grad():
            scale = torch.linspace(0.2, 3.0, layer.out_channels).view(-1, 1, 1, 1)
            layer.weight.mul_(scale / layer.weight.abs().amax((1, 2, 3), keepdim=True))
    return m.eval()


def _flops(c_in, c_out, d, h, w, h_out, w_out, g):
    """Supplement eq. (2): all FLOPs of a quantized adder layer with g scales."""
    return 2 * h * w * (c_in * d**2 + 1) * c_out + c_in * d**2 * c_out + g * h * w * c_in + h_out * w_out * c_out


@pytest.fixture(scope="module")
def compiled():
    calib = torch.randn(64, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    return qcompiler.compile(_model(), qcompiler.QuantSpec(passes="outlier-clamp,adder-groups", adder_groups=4), calib_data=calib)


def test_one_row_per_quantized_adder_layer(compiled):
    rows = adder_group_cost(compiled.module)
    assert [r.layer for r in rows] == ["_3", "_6"]
    assert [(r.in_channels, r.groups) for r in rows] == [(6, 4), (6, 4)]
    for r in rows:
        layer = next(n for n in compiled.module.graph.nodes if n.name == r.layer)
        assert r.groups == len(ir.get(layer, ir.ADDER_Q, ir.AdderScales).group_ranges)


def test_stride_1_layer_matches_eqs_2_to_4_by_hand(compiled):
    row = adder_group_cost(compiled.module)[0]
    g, c, k = 4, 6, 10
    one = _flops(c, c, 3, k, k, k, k, g=1)
    # eq. (2), by hand: 2*100*55*6 + 6*9*6 + 100*6 + 100*6
    assert one == 66000 + 324 + 600 + 600
    extra = _flops(c, c, 3, k, k, k, k, g) - one
    assert extra == (g - 1) * k * k * c
    assert row.exact_pct == pytest.approx(100.0 * extra / one, rel=1e-12)
    # eq. (3): FLOPs_all = 18k^2c^2 + gk^2c + 9c^2 + 3k^2c for d=3, c_in=c_out=c, h=w=k
    assert _flops(c, c, 3, k, k, k, k, g) == 18 * k**2 * c**2 + g * k**2 * c + 9 * c**2 + 3 * k**2 * c
    # eq. (4): r = (g-1)k^2 / ((18k^2 + 9)c + 4k^2) ~ (g-1)/(18c+4)
    assert row.exact_pct == pytest.approx(100.0 * (g - 1) * k**2 / ((18 * k**2 + 9) * c + 4 * k**2), rel=1e-12)
    assert row.closed_form_pct == pytest.approx(100.0 * (g - 1) / (18 * c + 4), rel=1e-12)
    assert row.closed_form_pct == pytest.approx(100.0 * 3 / 112)
    assert row.exact_pct < row.closed_form_pct  # the 9c^2 term only adds to the denominator
    assert row.exact_pct == pytest.approx(row.closed_form_pct, rel=0.01)


def test_strided_layer_uses_its_input_and_output_sizes(compiled):
    row = adder_group_cost(compiled.module)[1]
    one = _flops(6, 12, 3, 10, 10, 5, 5, g=1)
    assert one == 2 * 100 * 55 * 12 + 6 * 9 * 12 + 100 * 6 + 25 * 12
    assert row.exact_pct == pytest.approx(100.0 * 3 * 100 * 6 / one, rel=1e-12)
    assert row.closed_form_pct == pytest.approx(100.0 * 3 / (18 * 6 + 4), rel=1e-12)


def test_one_shared_scale_costs_nothing_extra():
    calib = torch.randn(64, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    c = qcompiler.compile(_model(), qcompiler.QuantSpec(passes="adder-shared"), calib_data=calib)
    rows = adder_group_cost(c.module)
    assert [r.groups for r in rows] == [1, 1]
    assert all(r.exact_pct == 0.0 and r.closed_form_pct == 0.0 for r in rows)


def test_no_rows_without_adder_quantization():
    calib = torch.randn(16, 1, 10, 10)
    c = qcompiler.compile(_model(), qcompiler.QuantSpec(passes="outlier-clamp"), calib_data=calib)
    assert adder_group_cost(c.module) == ()
    assert c.report.sections == ()


def test_adder_passes_report_the_group_cost_section(compiled):
    (section,) = compiled.report.sections
    assert section.title == "Extra operations of the adder scale groups (supplement, Prop. 2)"
    assert section.table == group_cost_table(adder_group_cost(compiled.module))


def test_table_lists_each_layer_with_both_percentages(compiled):
    rows = adder_group_cost(compiled.module)
    lines = group_cost_table(rows).splitlines()
    assert lines[0].split() == ["adder", "layer", "c", "g", "extra", "FLOPs", "%", "(g-1)/(18c+4)", "%"]
    assert len(lines) == 2 + len(rows)
    for line, r in zip(lines[2:], rows):
        assert line.split() == [r.layer, str(r.in_channels), str(r.groups), f"{r.exact_pct:.3f}", f"{r.closed_form_pct:.3f}"]
    assert "2.679" in lines[2]  # 100 * 3 / 112
