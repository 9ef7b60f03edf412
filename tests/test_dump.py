"""Golden test of the IR dump: the listing after ``lsq`` on a fixed tiny model.

Set ``QC_UPDATE_GOLDEN=1`` to rewrite ``tests/golden/lsq_tiny.txt`` after an intended
change of the dump format, then review the diff of the golden file.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.observers import RangeObserver
from qcompiler.quantizers.init import choose_signed, fit_act_grid
from qcompiler.dump import format_graph, node_line

GOLDEN = Path(__file__).parent / "golden" / "lsq_tiny.txt"
# A number standing on its own (not part of a name such as ``%_0_act`` or ``0.weight_quant``).
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.])")


def _tiny_model_and_data(activation: type[nn.Module] = nn.ReLU) -> tuple[nn.Module, torch.Tensor]:
    """Integer weights and inputs: every activation and range is exact in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), activation(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape).float())
    calib = torch.randint(-3, 4, (8, 1, 5, 5)).float()
    return model, calib


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, calib = _tiny_model_and_data()
    out = tmp_path_factory.mktemp("ir")
    qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq", weight_bits=4, act_bits=4), calib_data=calib, dump_ir=out)
    return out


def _split_numbers(text: str) -> tuple[str, list[float]]:
    return NUMBER.sub("<n>", text), [float(m) for m in NUMBER.findall(text)]


def test_dump_files_numbered(dump_dir: Path) -> None:
    stems = ["00_input", "01_pin-first-last", "02_observe", "03_lsq", "04_quantize-matmuls", "05_quantize-joins", "06_bias-correction", "07_freeze"]
    assert sorted(p.name for p in dump_dir.iterdir()) == sorted(f"{s}.{e}" for s in stems for e in ("txt", "dot"))


def _assert_matches_golden(text: str, golden_path: Path) -> None:
    if os.environ.get("QC_UPDATE_GOLDEN") == "1":
        golden_path.parent.mkdir(parents=True, exist_ok=True)
        golden_path.write_text(text)
    golden = golden_path.read_text()
    got_structure, got_numbers = _split_numbers(text)
    want_structure, want_numbers = _split_numbers(golden)
    # Structure (names, ops, records, every field name) exactly; numbers to 6 significant digits.
    if got_structure != want_structure:
        diff = "\n".join(difflib.unified_diff(golden.splitlines(), text.splitlines(), "golden", "got", lineterm=""))
        pytest.fail(f"IR dump differs from {golden_path} (QC_UPDATE_GOLDEN=1 rewrites it):\n{diff}")
    assert got_numbers == pytest.approx(want_numbers, rel=1e-5, abs=1e-12)


def test_lsq_dump_matches_golden(dump_dir: Path) -> None:
    _assert_matches_golden((dump_dir / "03_lsq.txt").read_text(), GOLDEN)


class _TinyResidual(nn.Module):
    """conv -> relu -> (conv + identity) -> relu -> linear, integer weights."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2 * 5 * 5, 3)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.stem(x))
        return self.fc(torch.flatten(self.relu2(self.conv(x) + x), 1))


def test_quantize_joins_dump_matches_golden(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TinyResidual().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape).float())
    calib = torch.randint(0, 4, (8, 1, 5, 5)).float()
    qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq", weight_bits=4, act_bits=4), calib_data=calib, dump_ir=tmp_path)
    _assert_matches_golden((tmp_path / "05_quantize-joins.txt").read_text(), GOLDEN.parent / "joins_tiny.txt")


def test_golden_numbers_are_the_exact_ones(dump_dir: Path) -> None:
    """Ranges of integer data are exact: spot-check them without the golden file."""
    text = (dump_dir / "03_lsq.txt").read_text()
    model, calib = _tiny_model_and_data()
    lo, hi = float(calib.min()), float(calib.max())
    mean_abs = float(calib.abs().double().mean())
    assert f"TensorRange(min={lo:.6g}, max={hi:.6g}, mean_abs={mean_abs:.6g}," in text
    assert f"count={calib.numel()})" in text
    with torch.no_grad():
        flat = model[2](model[1](model[0](calib)))
    assert f"TensorRange(min=0, max={float(flat.max()):.6g}, mean_abs={float(flat.double().mean()):.6g}," in text
    # the input's step: the least-error clip on the observed histogram (spec.init's default "mse")
    obs = RangeObserver()
    obs.update(calib)
    rng = obs.summary()
    fit = fit_act_grid(rng.hist, 8, choose_signed(rng, 8))
    assert fit.signed
    assert f"signed=True, module='_0_act', init='mse', learned=False)" in text
    assert f"step={fit.step:.6g}, rounding='half-to-even'" in (dump_dir / "07_freeze.txt").read_text()


def test_diff_observe_to_lsq_only_adds_quantizers(dump_dir: Path) -> None:
    before = (dump_dir / "02_observe.txt").read_text().splitlines()
    after = (dump_dir / "03_lsq.txt").read_text().splitlines()
    assert before[0].startswith("# after pass 2: observe") and after[0].startswith("# after pass 3: lsq")
    diff = list(difflib.ndiff(before[1:], after[1:]))
    removed = [line[2:] for line in diff if line.startswith("- ")]
    added = [line[2:] for line in diff if line.startswith("+ ")]

    # Only the layers' call lines change: they now read their quantizer instead of the tensor.
    layer_line = re.compile(r"^%(?P<name>\w+) = module (?P<target>[\w.]+)\(%(?P<src>\w+)\) :: \[[\d, ]+\]$")
    rewired: dict[str, str] = {}
    for line in removed:
        m = layer_line.match(line)
        assert m, f"line removed that is not a layer call: {line!r}"
        new = line.replace(f"(%{m['src']})", f"(%{m['name']}_act)")
        assert new in added, f"{line!r} was not rewired to its quantizer"
        rewired[m["name"]] = m["src"]
    assert sorted(rewired) == ["_0", "_3"]

    expected_added = set()
    for name, src in rewired.items():
        expected_added.add(next(a for a in added if a.startswith(f"%{name} = module")))
        expected_added.add(next(a for a in added if a.startswith(f"%{name}_act = module {name}_act(%{src}) :: ")))
    for line in added:
        if line in expected_added:
            continue
        assert line.startswith("    qc.act    ActQuant(") or line.startswith("    qc.weight WeightQuant("), line
    assert sum(a.startswith("    qc.act ") for a in added) == 2
    assert sum(a.startswith("    qc.weight ") for a in added) == 2
    # Every kept line is kept verbatim and in order (ndiff marks it with two spaces).
    kept = [line[2:] for line in diff if line.startswith("  ")]
    assert kept == [line for line in before[1:] if line not in removed]


def test_dot_lists_every_node_and_edge(dump_dir: Path) -> None:
    dot = (dump_dir / "03_lsq.dot").read_text()
    for name in ("input_1", "_0_act", "_0", "_1", "_2", "_3_act", "_3", "output"):
        assert f'  "{name}" [label="' in dot
    assert '"input_1" -> "_0_act";' in dot and '"_0_act" -> "_0";' in dot and '"_3" -> "output";' in dot
    assert "fillcolor=khaki" in dot and "fillcolor=lightblue" in dot


def test_format_graph_and_node_line() -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    text = format_graph(gm, "title")
    assert text.splitlines() == ["# title", "%input_1 = input", "%_0 = module 0(%input_1)", "return %_0"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert node_line(out) == "return %_0"


def test_lookup_activations_dump_matches_golden(tmp_path: Path) -> None:
    """A hardswish gets an input quantizer of the activation width and a ``Lookup`` record naming it."""
    model, calib = _tiny_model_and_data(nn.Hardswish)
    spec = qcompiler.QuantSpec(passes="lsq,lookup-activations", weight_bits=4, act_bits=4)
    qcompiler.compile(model, spec, calib_data=calib, dump_ir=tmp_path)
    text = (tmp_path / "04_lookup-activations.txt").read_text()
    assert "Lookup(input='_1_in0', bits=4, function='module Hardswish')" in text
    _assert_matches_golden(text, GOLDEN.parent / "lookup_tiny.txt")
