"""Reports: ASQ's adapter overhead (ASQ paper, Table 1) and the pass sections of a report."""

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.passes.asq import ADAPTER_PARAM_BITS, asq_overhead


def test_adapter_overhead_matches_a_hand_computation():
    # One conv 16->32 3x3 on 8x8 (not pinned) between two pinned layers.
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="asq"), calib_data=torch.rand(4, 4, 8, 8))
    rows = {r.bits: r for r in asq_overhead(c.module, (8, 4, 2))}

    # Paper eqs. 10-13: conv params Cin*Cout*K*K, linear N_in*N_out + N_out; OPS = MACs.
    params = 4 * 16 * 1 + 16 * 32 * 9 + (2048 * 10 + 10)
    ops = 4 * 16 * 64 + 16 * 32 * 9 * 64 + 2048 * 10
    # The only adapter sits on the middle conv's 16-channel input: 16 -> 4 -> 1.
    adapter_params = 16 * 4 + 4 + 4 * 1 + 1
    adapter_ops = 16 * 4 + 4
    for b in (8, 4, 2):
        assert rows[b].param_pct == pytest.approx(100 * adapter_params * ADAPTER_PARAM_BITS / (params * b))
        assert rows[b].ops_pct == pytest.approx(100 * adapter_ops / (ops * b / 32))
    assert rows[2].param_pct == pytest.approx(4 * rows[8].param_pct)


def test_no_adapter_no_overhead():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.rand(2, 1, 6, 6))
    assert all(r.param_pct == 0 and r.ops_pct == 0 for r in asq_overhead(c.module))


def test_asq_owns_its_report_section_and_report_txt_holds_it(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="asq", act_bits=5), calib_data=torch.rand(4, 1, 6, 6))
    (section,) = c.report.sections
    assert section.title == "ASQ adapter overhead (ASQ paper, Table 1)"
    assert [line.split()[0] for line in section.table.splitlines()[2:]] == ["8", "5", "4", "3", "2"]
    assert section.text() in c.report.text()
    c.save(tmp_path / "out")
    assert (tmp_path / "out" / "report.txt").read_text() == c.report.text() + "\n"
    loaded = qcompiler.Compiled.load(tmp_path / "out", trust=True)  # no pass ran: layers, no sections
    assert loaded.report.sections == () and loaded.report.layers == c.report.layers


def test_passes_without_a_section_add_none():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.rand(2, 1, 6, 6))
    assert c.report.sections == ()


class _Upsample(torch.nn.ConvTranspose2d):
    """A subclass that overrides forward: it could compute anything, so it stays float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class _FloatWeights(torch.nn.Module):
    """A ConvTranspose2d subclass overriding forward and a functional conv whose weight is a buffer: ops no pass quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.up = _Upsample(8, 8, 2, stride=2)
        self.register_buffer("w", torch.randn(8, 8, 3, 3) * 0.1)  # a Parameter would make it a quantized Conv2d
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(torch.relu(self.c1(x))))
        return self.fc(torch.nn.functional.conv2d(h, self.w, padding=1).mean((2, 3)))


def test_layers_left_in_float_get_a_row_and_a_warning() -> None:
    from qcompiler.api import FloatLayerWarning

    with pytest.warns(FloatLayerWarning) as caught:
        compiled = qcompiler.compile(_FloatWeights(), qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(8, 1, 8, 8))
    rows = {r.name: r for r in compiled.report.layers}
    assert list(rows) == ["c1", "up", "conv2d", "fc"]  # graph order
    assert rows["up"].weight_bits is None and rows["up"].weight_quantizer == (
        "float: _Upsample subclasses nn.ConvTranspose2d but overrides forward, so it may not compute a "
        "conv_transpose2d; it runs as written, in float")
    assert rows["up"].params == 8 * 8 * 2 * 2 + 8
    assert rows["conv2d"].weight_quantizer == "float: functional conv2d: its weight 'w' is a buffer or tensor constant, not an nn.Parameter"
    assert "fp32" in compiled.report.layer_table().splitlines()[3]
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("2 layer(s) with weights stay in float: up (_Upsample subclasses") for m in messages), messages
    # c1 and fc are pinned at 8 bits and the rest is float: nothing is at the requested 4 bits
    assert any(m.startswith("no layer is at the requested W4A4") for m in messages), messages


class _SharedConv(torch.nn.Module):
    """One conv module called at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.shared, self.fc = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.c0(x))))))
        return self.fc(h.mean((2, 3)))


def test_a_module_called_twice_has_one_weight_grid_and_the_report_says_so() -> None:
    from qcompiler import ir

    spec = qcompiler.QuantSpec(passes="lsq", overrides=(qcompiler.spec.LayerOverride("shared_1", weight_bits=6),))
    compiled = qcompiler.compile(_SharedConv(), spec, calib_data=torch.randn(8, 1, 8, 8))
    rows = {r.name: r for r in compiled.report.layers}
    # one weight tensor, one grid: the widest width any call site asks for, at both sites
    assert rows["shared"].weight_bits == rows["shared_1"].weight_bits == 6
    assert rows["shared"].act_bits == rows["shared_1"].act_bits == 4
    assert rows["shared"].weight_quantizer == rows["shared_1"].weight_quantizer == "uniform per-channel, mse init (shared: shared, shared_1)"
    layers = {n.name: n for n in ir.compute_layers(compiled.module)}
    assert compiled.module.get_submodule("shared.weight_quant").bits == 6
    assert ir.get(layers["shared"], ir.WEIGHT, ir.WeightQuant) == ir.get(layers["shared_1"], ir.WEIGHT, ir.WeightQuant)


class _Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.rnn, self.fc = torch.nn.Linear(3, 8), torch.nn.LSTM(8, 8, batch_first=True), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.inp(x))
        return self.fc(y[:, -1])


def test_a_recurrent_layer_gets_a_float_row_with_its_reason() -> None:
    from qcompiler.api import FloatLayerWarning

    with pytest.warns(FloatLayerWarning, match="rnn \\(LSTM is a recurrent layer"):
        compiled = qcompiler.compile(_Recurrent(), qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(8, 5, 3))
    row = {r.name: r for r in compiled.report.layers}["rnn"]
    assert row.weight_bits is None and row.float_reason.startswith("LSTM is a recurrent layer")
    assert row.weight_quantizer == f"float: {row.float_reason}" and row.params == sum(p.numel() for p in _Recurrent().rnn.parameters())
