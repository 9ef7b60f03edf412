"""Per-channel steps on residual-add operands (``QuantSpec.per_channel_joins``): placed only on a
batch norm's output that the join alone reads, fitted per channel, recorded, and computed alike
by the fake-quant module, the integer program and both ONNX forms."""

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.data import load_digits
from qcompiler.errors import QCompileError
from qcompiler.spec import SpecError
from qcompiler.verify import verify_graph

from numeric_checks import assert_backends_agree


class SpreadBlock(nn.Module):
    """stem -> residual block whose second batch norm has gains spread over two decades (the
    channels of the add's operand then differ in range as much) -> pool -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        x = torch.relu(out + x)
        return self.fc(self.pool(x).flatten(1))


def spread_block() -> SpreadBlock:
    torch.manual_seed(0)
    model = SpreadBlock()
    with torch.no_grad():
        model.train()
        model(load_digits().x_train[:256])  # batch norm statistics of real inputs
        model.bn2.weight.copy_(torch.logspace(-2, 0.3, 16))
    return model.eval()


SPEC = qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8, pin_first_last=False)


@pytest.fixture(scope="module")
def compiled_pair():
    data = load_digits()
    model = spread_block()
    return (model, qcompiler.compile(model, SPEC, calib_data=data),
            qcompiler.compile(model, SPEC.replace(per_channel_joins=True), calib_data=data))


def channel_quantizers(c) -> list[fx.Node]:
    return [n for n in c.module.graph.nodes if ir.ACT in n.meta and ir.get(n, ir.ACT, ir.ActQuant).channel_axis is not None]


def test_only_the_batch_norm_operand_gets_channel_steps(compiled_pair):
    _, per_tensor, per_channel = compiled_pair
    assert channel_quantizers(per_tensor) == []
    (q,) = channel_quantizers(per_channel)
    assert q.args[0].target == "bn2"  # not the stem's output (the other operand, also read by conv1)
    assert all(u.target is torch.add or getattr(u.target, "__name__", "") == "add" for u in q.users)
    rec = ir.get(q, ir.ACT, ir.ActQuant)
    assert rec.role == "join" and rec.channel_axis == 1 and "channel_axis=1" in ir.format_record(rec)
    per_tensor.freeze()
    per_channel.freeze()
    frozen = ir.get(q, ir.STEP, ir.FrozenAct)
    assert frozen.channel_axis == 1 and len(frozen.step) == 16
    steps = np.asarray(frozen.step)
    assert steps.max() > 20 * steps.min()  # the gains' spread shows in the steps
    # the join's result stays one grid for the tensor: the next layer reads it
    join = next(n for n in per_channel.module.graph.nodes if ir.JOIN in n.meta)
    out = next(n for n in per_channel.module.graph.nodes if n.name == ir.get(join, ir.JOIN, ir.Join).output)
    assert ir.get(out, ir.ACT, ir.ActQuant).channel_axis is None
    assert "1 operand(s) with one step per channel" in per_channel.report.domain_summary()
    assert "per channel" not in per_tensor.report.domain_summary()


def test_channel_steps_lose_less(compiled_pair):
    model, per_tensor, per_channel = compiled_pair
    x = load_digits().x_test
    with torch.no_grad():
        h = torch.relu(model.bn0(model.stem(x)))
        seen = model.bn2(model.conv2(torch.relu(model.bn1(model.conv1(h)))))  # the add's operand in float
        relative, total = [], []
        for c in (per_tensor, per_channel):
            bn2 = next(n for n in c.module.graph.nodes if n.target == "bn2")
            (q,) = [u for u in bn2.users if ir.ACT in u.meta]
            err = c.module.get_submodule(q.target).eval()(seen) - seen
            per = err.square().sum((0, 2, 3)).sqrt() / seen.square().sum((0, 2, 3)).sqrt()
            relative.append(float(per.mean()))
            total.append(float(err.square().mean()))
    # the small-gain channels no longer sit on a few codes of the widest one's grid
    assert relative[1] < 0.2 * relative[0], relative
    assert total[1] <= total[0], total


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
def test_backends_agree(compiled_pair, fmt):
    assert_backends_agree(compiled_pair[2], load_digits().x_test, fmt)


def test_with_zero_points_too():
    data = load_digits()
    c = qcompiler.compile(spread_block(), SPEC.replace(per_channel_joins=True, asymmetric_acts=True), calib_data=data)
    assert len(channel_quantizers(c)) == 1
    assert_backends_agree(c, data.x_test, "program")


def test_qat_learns_the_channel_steps(compiled_pair):
    _, _, c = compiled_pair
    module = c.module
    (q,) = channel_quantizers(c)
    quantizer = module.get_submodule(q.target)
    data = load_digits()
    module.train()
    try:
        loss = nn.functional.cross_entropy(module(data.x_train[:32]), data.y_train[:32])
        loss.backward()
        grad = quantizer.step.grad
        assert grad is not None and grad.shape == (16,) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        module.zero_grad(set_to_none=True)
        module.eval()


def test_a_layer_reading_channel_steps_is_refused():
    data = load_digits()
    c = qcompiler.compile(spread_block(), SPEC.replace(per_channel_joins=True), calib_data=data)
    gm = c.module
    (q,) = channel_quantizers(c)
    with gm.graph.inserting_after(q):  # a hand edit: something else reads the per-channel codes too
        extra = gm.graph.call_function(torch.relu, (q,))
    with pytest.raises(QCompileError, match=f"one step per channel but '{extra.name}', not a join, reads it"):
        verify_graph(gm)


def test_save_and_load_keep_the_channel_steps(compiled_pair, tmp_path):
    _, _, c = compiled_pair
    c.save(tmp_path / "out")
    back = qcompiler.Compiled.load(tmp_path / "out", trust=True)
    (q,) = channel_quantizers(back)
    back.freeze()
    c.freeze()
    assert ir.get(q, ir.STEP, ir.FrozenAct).step == ir.get(
        next(n for n in c.module.graph.nodes if n.name == q.name), ir.STEP, ir.FrozenAct).step
    x = load_digits().x_test[:64]
    with torch.no_grad():
        assert torch.equal(back.module.eval()(x), c.module.eval()(x))


def test_cli_flag_and_spec_type():
    from qcompiler.cli import _spec_from_args, build_parser

    assert _spec_from_args(build_parser().parse_args(["m.pt", "--per-channel-joins"])).per_channel_joins is True
    assert _spec_from_args(build_parser().parse_args(["m.pt"])).per_channel_joins is False
    with pytest.raises(SpecError, match="per_channel_joins must be true or false"):
        qcompiler.QuantSpec(per_channel_joins="yes")


def test_html_report_shows_the_channel_steps(compiled_pair, tmp_path):
    from qcompiler.html_report import write_html_report

    _, _, c = compiled_pair
    write_html_report(c, tmp_path / "report", load_digits().x_test[:128])
    text = "".join(p.read_text() for p in (tmp_path / "report").glob("*.html"))
    assert "one per channel (axis 1)" in text


def test_activation_channel_steps_stay_within_the_samples_reach():
    """A near-constant channel (a batch norm of tiny gain and a large shift) must not take a coarse
    step that happens to land on its value: steps never pass max|x| / qmax on activation samples."""
    from qcompiler.quantizers import UniformQuantizer

    torch.manual_seed(0)
    x = torch.randn(256, 4, 6, 6)
    x[:, 0] = -0.5 + 1e-4 * torch.randn(256, 6, 6)  # the LSQ start, 2 mean|x| / sqrt(p), is 15x max|x| / p here
    q = UniformQuantizer(8, signed=True, channels=4, channel_axis=1)
    q.init_per_channel(x, "mse")
    reach = x.movedim(1, 0).abs().flatten(1).max(1).values / q.qmax
    assert (q.step.detach() <= reach * (1 + 1e-6)).all(), (q.step, reach)


class CatNet(nn.Module):
    """Two batch-norm branches concatenated (as a dense block's), then a layer reading the result."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.head, self.fc = nn.Conv2d(12, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([self.bn_a(self.a(x)), self.bn_b(self.b(x))], 1)
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


@pytest.mark.parametrize("fmt", ["program", "custom", "qdq"])
def test_concat_operands_take_channel_steps_too(fmt):
    torch.manual_seed(0)
    model, data = CatNet(), load_digits()
    with torch.no_grad():
        model.train()
        model(data.x_train[:256])
        model.bn_a.weight.copy_(torch.logspace(-2, 0.3, 8))
    c = qcompiler.compile(model.eval(), SPEC.replace(per_channel_joins=True), calib_data=data)
    assert sorted(q.args[0].target for q in channel_quantizers(c)) == ["bn_a", "bn_b"]
    assert_backends_agree(c, data.x_test, fmt)
