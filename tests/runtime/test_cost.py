"""Cost model: multiply counts equal the layers' MACs; energy follows the Horowitz table."""

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler import ir
from qcompiler.data import load_digits
from qcompiler.runtime.cost import ENERGY_PJ, energy
from qcompiler.zoo import plain_cnn


def test_energy_table():
    assert energy("add", 4) == ENERGY_PJ[("add", 8)] and energy("mult", 16) == ENERGY_PJ[("mult", 32)]
    assert energy("add", 64) == pytest.approx(2 * ENERGY_PJ[("add", 32)])


@pytest.mark.parametrize("passes,unit", [("lsq", "mult"), ("lsq,pot", "shift")])
def test_counts_match_layer_macs(passes, unit):
    data = load_digits()
    torch.manual_seed(0)
    c = qcompiler.compile(plain_cnn(width=4), qcompiler.QuantSpec(passes=passes, weight_bits=4, act_bits=4), calib_data=data)
    report = c.lower().costs(data.x_test[:4].numpy())
    by_layer = {lc.layer: lc for lc in report.layers}
    for node in ir.compute_layers(c.module):
        counts = by_layer[node.name].counts
        products = sum(v for k, v in counts.items() if k.startswith(("mult", "shift")) and not k.startswith("mult32"))
        assert products == ir.get(node, ir.LAYER, ir.LayerInfo).macs
    assert 0 < report.energy_pj < report.float_energy_pj
    assert np.isfinite(report.float_energy_pj) and "total" in report.text()
