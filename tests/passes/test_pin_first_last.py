"""Tests for the ``pin-first-last`` pass: records on the right layers, bits honoured."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from qcompiler import ir
from qcompiler.frontend import trace
from qcompiler.passes import REGISTRY, PassContext, PassManager, plan
from qcompiler.passes.pin_first_last import PinFirstLast
from qcompiler.passes.manager import NoChangeWarning
from qcompiler.spec import LayerOverride, QuantSpec


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)
    ).eval()


def _setup(spec: QuantSpec) -> tuple[nn.Module, fx.GraphModule, PassContext]:
    model = _model()
    torch.manual_seed(1)
    batches = [torch.randn(4, 1, 6, 6) for _ in range(2)]
    ctx = PassContext(spec=spec, example_inputs=(batches[0],), calib_batches=batches)
    return model, trace(model, ctx.example_inputs), ctx


def test_pins_first_and_last() -> None:
    model, gm, ctx = _setup(QuantSpec())
    code = gm.code
    gm, runs = PassManager([PinFirstLast.from_spec(ctx.spec)], verify=True).run(gm, ctx)
    assert runs[0].modified
    pins = {n.name: n.meta[ir.PIN] for n in gm.graph.nodes if ir.PIN in n.meta}
    assert pins == {
        "_0": ir.Pin(bits=8, reason="reads the network input"),
        "_5": ir.Pin(bits=8, reason="produces the network output"),
    }
    # An analysis: same graph, same numbers as eager.
    assert gm.code == code
    x = ctx.calib_batches[1]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_pin_bits_from_spec() -> None:
    _, gm, ctx = _setup(QuantSpec(pin_bits=6))
    passes = plan(("lsq",), ctx.spec, ctx.provided(), REGISTRY)
    assert isinstance(passes[0], PinFirstLast) and passes[0].bits == 6
    gm, _ = PassManager(passes).run(gm, ctx)
    assert {n.meta[ir.PIN].bits for n in gm.graph.nodes if ir.PIN in n.meta} == {6}


def test_pins_win_over_overrides_in_lsq() -> None:
    spec = QuantSpec(weight_bits=3, act_bits=3, overrides=(LayerOverride("*", weight_bits=2, act_bits=2),))
    _, gm, ctx = _setup(spec)
    gm, _ = PassManager(plan(("lsq",), spec, ctx.provided(), REGISTRY)).run(gm, ctx)
    bits = {n.name: (ir.get(n, ir.WEIGHT, ir.WeightQuant).bits, ir.get(n.args[0], ir.ACT, ir.ActQuant).bits)
            for n in ir.compute_layers(gm)}
    assert bits == {"_0": (8, 8), "_2": (2, 2), "_5": (8, 8)}


def test_second_run_reports_no_change() -> None:
    _, gm, ctx = _setup(QuantSpec())
    gm, first = PassManager([PinFirstLast()]).run(gm, ctx)
    with pytest.warns(NoChangeWarning, match="'pin-first-last' found nothing to change"):
        gm, second = PassManager([PinFirstLast()]).run(gm, ctx)
    assert first[0].modified and not second[0].modified
    # Different bits is a change.
    gm, third = PassManager([PinFirstLast(bits=6)]).run(gm, ctx)
    assert third[0].modified
    assert {n.meta[ir.PIN].bits for n in gm.graph.nodes if ir.PIN in n.meta} == {6}


def test_pins_found_after_quantizers_are_inserted() -> None:
    """Pinning reads the graph, so it finds the same layers through inserted quantizers."""
    spec = QuantSpec(weight_bits=4, act_bits=4)
    _, gm, ctx = _setup(spec)
    gm, _ = PassManager(plan(("lsq",), spec, ctx.provided(), REGISTRY)).run(gm, ctx)
    with pytest.warns(NoChangeWarning, match="'pin-first-last' found nothing to change"):
        gm, runs = PassManager([PinFirstLast()]).run(gm, ctx)
    assert not runs[0].modified
    assert sorted(n.name for n in gm.graph.nodes if ir.PIN in n.meta) == ["_0", "_5"]


class _ResidualMLP(torch.nn.Module):
    """Residual blocks on a skip stream; ``project`` adds an input and an output projection."""

    def __init__(self, project: bool, d: int = 16) -> None:
        super().__init__()
        self.project = project
        width = d if project else 64
        self.inp = torch.nn.Linear(64, d) if project else torch.nn.Identity()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)) for _ in range(3)
        )
        self.out = torch.nn.Linear(d, 10) if project else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


@pytest.mark.parametrize("project", [True, False])
def test_skip_connections_do_not_spread_the_pins(project: bool) -> None:
    """Only the first and last layers of the main path are pinned, not every layer the skip stream reaches."""
    import qcompiler

    compiled = qcompiler.compile(_ResidualMLP(project), calib_data=torch.randn(16, 1, 8, 8))
    pinned = {r.name: r.pinned for r in compiled.report.layers if r.pinned}
    if project:
        assert pinned == {"inp": "reads the network input", "out": "produces the network output"}
    else:  # the skip stream carries the raw input to every block and every block's result to the output
        assert pinned == {"blocks_0_0": "reads the network input", "blocks_2_2": "produces the network output"}
