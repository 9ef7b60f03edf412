"""Tests for the ``observe`` pass: ranges of every layer input, graph untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

from qcompiler import ir
from qcompiler.frontend import trace
from qcompiler.passes import PassContext, PassManager
from qcompiler.passes.observe import Observe
from qcompiler.spec import QuantSpec


class Branchy(nn.Module):
    """Input -> conv -> BN -> ReLU, read by two layers (a shared input), then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.left = nn.Conv2d(4, 4, 3, padding=1)
        self.right = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = self.left(h) - self.right(h)
        return self.fc(h.mean(dim=(2, 3)))


def _setup(n_batches: int = 5) -> tuple[nn.Module, fx.GraphModule, PassContext]:
    torch.manual_seed(0)
    model = Branchy().eval()
    with torch.no_grad():  # non-trivial BN statistics so that the observed ranges differ
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    # Batches of growing scale: each batch widens the range.
    batches = [torch.randn(8, 1, 6, 6) * (1 + i) + 0.1 * i for i in range(n_batches)]
    ctx = PassContext(spec=QuantSpec(), example_inputs=(batches[0],), calib_batches=batches)
    return model, trace(model, ctx.example_inputs), ctx


def _layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The input of every conv/linear over all batches, captured with eager hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {name: torch.cat([t.flatten() for t in ts]) for name, ts in seen.items()}


def test_ranges_match_eager_layer_inputs() -> None:
    model, gm, ctx = _setup()
    code_before = gm.code
    n_nodes = len(gm.graph.nodes)
    gm, runs = PassManager([Observe()]).run(gm, ctx)
    assert runs[0].modified
    # Observation is an analysis: the graph is unchanged.
    assert gm.code == code_before and len(gm.graph.nodes) == n_nodes

    inputs = _layer_inputs(model, ctx.calib_batches)
    for layer in ir.compute_layers(gm):
        rng = ir.get(layer.args[0], ir.RANGE, ir.TensorRange)
        x = inputs[str(layer.target)].double()
        assert rng.min == float(x.min()) and rng.max == float(x.max())
        assert rng.count == x.numel()
        assert rng.mean_abs == pytest.approx(float(x.abs().mean()), rel=1e-9)
        a = x.abs().numpy()
        bin_width = 2 * float(a.max()) / 2048  # the histogram's edge is at most 2 * max|x|
        # The histogram inverts the empirical CDF (the ceil(q*n)-th smallest |x|), numpy's
        # "inverted_cdf"; the default "linear" differs by up to one gap between order statistics.
        for q, got in ((99.9, rng.abs_p999), (99.99, rng.abs_p9999)):
            assert abs(got - np.percentile(a, q, method="inverted_cdf")) <= bin_width + 1e-9
        assert rng.abs_p999 <= rng.abs_p9999 <= max(-rng.min, rng.max)


def test_records_only_on_layer_inputs() -> None:
    _, gm, ctx = _setup()
    gm, _ = PassManager([Observe()]).run(gm, ctx)
    with_range = {n.name for n in gm.graph.nodes if ir.RANGE in n.meta}
    # x feeds conv; relu feeds both left and right (one record); mean feeds fc.
    assert with_range == {"x", "relu", "mean"}
    assert ir.get(gm.graph.find_nodes(op="placeholder")[0], ir.RANGE, ir.TensorRange).signed
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    assert not ir.get(relu, ir.RANGE, ir.TensorRange).signed
    assert ir.get(relu, ir.RANGE, ir.TensorRange).min == 0.0


def test_first_batch_only_when_one_batch() -> None:
    model, gm, ctx = _setup(n_batches=1)
    gm, _ = PassManager([Observe()]).run(gm, ctx)
    x = ctx.calib_batches[0]
    rng = ir.get(gm.graph.find_nodes(op="placeholder")[0], ir.RANGE, ir.TensorRange)
    assert (rng.min, rng.max, rng.count) == (float(x.min()), float(x.max()), x.numel())
    assert rng.mean_abs == pytest.approx(float(x.double().abs().mean()), rel=1e-9)


def test_observe_keeps_bn_statistics_and_mode() -> None:
    _, gm, ctx = _setup()
    gm.train()
    bn = gm.get_submodule("bn")
    mean, var, tracked = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    gm, _ = PassManager([Observe()]).run(gm, ctx)
    assert gm.training
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == tracked


def test_second_run_reports_no_change() -> None:
    _, gm, ctx = _setup()
    gm, first = PassManager([Observe()]).run(gm, ctx)
    before = {n.name: n.meta.get(ir.RANGE) for n in gm.graph.nodes}
    gm, second = PassManager([Observe()]).run(gm, ctx)
    assert first[0].modified and not second[0].modified
    assert {n.name: n.meta.get(ir.RANGE) for n in gm.graph.nodes} == before


def test_new_data_reports_change() -> None:
    _, gm, ctx = _setup()
    gm, _ = PassManager([Observe()]).run(gm, ctx)
    ctx.calib_batches = [b * 2 for b in ctx.calib_batches]
    gm, runs = PassManager([Observe()]).run(gm, ctx)
    assert runs[0].modified
    x = torch.cat(ctx.calib_batches)
    assert ir.get(gm.graph.find_nodes(op="placeholder")[0], ir.RANGE, ir.TensorRange).max == float(x.max())


def test_mean_abs_of_known_data() -> None:
    gm = trace(nn.Sequential(nn.Linear(4, 2)), (torch.zeros(1, 4),))
    batches = [torch.tensor([[1.0, -2.0, 3.0, -4.0]]), torch.tensor([[0.5, 0.5, -0.5, 8.0]])]
    ctx = PassContext(spec=QuantSpec(), example_inputs=(batches[0],), calib_batches=batches)
    gm, _ = PassManager([Observe()]).run(gm, ctx)
    rng = ir.get(gm.graph.find_nodes(op="placeholder")[0], ir.RANGE, ir.TensorRange)
    assert (rng.min, rng.max, rng.count) == (-4.0, 8.0, 8)
    assert math.isclose(rng.mean_abs, 19.5 / 8)
