"""Smoke test of bench/ptq.py on two tiny runs: a row per model, finite errors, torch.ao filled or explained.

The targets (2 % error, 99 % agreement, no worse than torch.ao) are not asserted here:
one training epoch and two calibration batches are far from the real run;
``python bench/ptq.py --check`` checks them.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from bench_scripts import load_bench

MODELS = ("plain_cnn", "unet")  # a zoo model and a foreign one whose ConvTranspose2d exercises the float-layer path
PCT = r"([0-9]+\.[0-9]+) %"
# model  qc rel.err  qc agree  qc q/float  ao rel.err  ao agree  ao q/float   (or "failed: reason  -  -" per side)
SIDE = rf"(?:{PCT}\s+{PCT}\s+([0-9]+) / ([0-9]+)|failed: .+?\s+-\s+-)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run of the bench, shared by the tests: (exit status, stdout, results file text)."""
    out = tmp_path_factory.mktemp("ptq") / "ptq.md"
    bench = load_bench("ptq")
    from io import StringIO
    from contextlib import redirect_stdout

    buffer = StringIO()
    with redirect_stdout(buffer):
        status = bench.main(["--models", ",".join(MODELS), "--epochs", "1", "--calib-batches", "2",
                             "--calib-batch-size", "32", "--out", str(out)])
    return status, buffer.getvalue(), out.read_text()


def test_every_model_has_a_row_with_finite_numbers(run):
    status, out, _ = run
    assert status == 0  # without --check a missed target is not a failure
    for model in MODELS:
        row = re.search(rf"^{model}\s+{SIDE}\s+{SIDE}$", out, re.MULTILINE)
        assert row, out
        qc_err, qc_agree, qc_q, qc_float = row.groups()[:4]
        assert qc_err is not None, f"qcompiler failed on {model}: {out}"
        assert math.isfinite(float(qc_err)) and float(qc_err) >= 0, out
        assert 0 <= float(qc_agree) <= 100, out
        assert int(qc_q) > 0, out  # it quantized something
        ao = row.groups()[4:]
        if ao[0] is not None:  # torch.ao ran: its numbers are real too
            assert math.isfinite(float(ao[0])) and 0 <= float(ao[1]) <= 100 and int(ao[2]) > 0, out
    # the UNet's two ConvTranspose2d are either quantized or named as float layers with a reason
    unet_float = int(re.search(rf"^unet\s+{PCT}\s+{PCT}\s+[0-9]+ / ([0-9]+)", out, re.MULTILINE).group(3))
    if unet_float:
        assert re.search(r"unet, qcompiler float layers: `up2` \(.+\)", out), out
    assert "qcompiler spec: {" in out and '"weight_bits": 8' in out and '"act_bits": 8' in out


def test_each_target_is_reported_per_model(run):
    _, out, _ = run
    for model in MODELS:
        lines = re.findall(rf"^- (MET  |MISSED|n/a   \(torch\.ao failed\)) {model}: (.+)$", out, re.MULTILINE)
        assert [t for _, t in lines] == ["rel. error <= 2%", "agreement >= 99%", "rel. error <= torch.ao",
                                         "agreement >= torch.ao"], out


def test_results_file_has_the_header_and_a_table_row_per_model(run):
    _, _, text = run
    assert text.startswith("# 8-bit PTQ")
    for field in ("Command: `python bench/ptq.py --models", "UTC", "commit ", "Machine: ", "torch threads 1",
                  "qcompiler spec: `{", "qcompiler measured: the package as of commit "):
        assert field in text, field
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split(" ")[1] for r in rows] == list(MODELS), text
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[2].endswith("%") and math.isfinite(float(cells[2].split()[0])), r
        assert cells[5].endswith("%") or cells[5].startswith("failed: "), r  # torch.ao: a number or its reason


def test_a_torch_ao_failure_is_one_line_in_its_column(monkeypatch):
    """torch.ao refusing a model leaves its cells to the reason; the bench does not crash."""
    bench = load_bench("ptq")
    import torch.ao.quantization.quantize_fx as quantize_fx

    def refuse(*args, **kwargs):
        raise RuntimeError("symbolically traced variables cannot be used\nas inputs to control flow")

    monkeypatch.setattr(quantize_fx, "prepare_fx", refuse)
    data = bench.load_data("digits")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    outcome = bench.run_torch_ao(model, [data.x_train[:8]], data, torch.zeros(len(data.x_test), 10))
    assert not outcome.ok
    assert outcome.failure == "RuntimeError: symbolically traced variables cannot be used"
    assert bench._cells(outcome) == ("failed: RuntimeError: symbolically traced variables cannot be used", "-", "-")


def test_zero_points_are_on_unless_symmetric_is_asked():
    bench = load_bench("ptq")
    assert bench.qcompiler_spec(8).asymmetric_acts is True  # as torch.ao's quint8 activations
    assert bench.qcompiler_spec(8, asymmetric=False).asymmetric_acts is False


def test_per_channel_joins_are_on_unless_per_tensor_is_asked():
    bench = load_bench("ptq")
    assert bench.qcompiler_spec(8).per_channel_joins is True
    assert bench.qcompiler_spec(8, per_channel_joins=False).per_channel_joins is False


def test_lookup_activations_only_when_asked():
    bench = load_bench("ptq")
    assert "lookup-activations" not in bench.qcompiler_spec(8).passes
    assert bench.qcompiler_spec(8, lookup=True).passes == ("smooth", "lsq", "lookup-activations", "refine-steps")


def test_the_spec_line_says_which(run):
    _, _, text = run
    assert '"asymmetric_acts": true' in text and '"per_channel_joins": true' in text
