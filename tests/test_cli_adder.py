"""qcompile on an AdderNet checkpoint: outlier-clamp + adder-groups from the command line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.data import load_digits
from qcompiler.modelio import save_checkpoint
from qcompiler.nn.adder import AdderConv2d
from qcompiler.quantizers.adder import QAdderConv2d
from qcompiler.train import TrainConfig, train
from qcompiler.zoo import adder_resnet20

ARGS = ["--passes", "outlier-clamp,adder-groups", "--bits", "4", "--data", "digits"]
ADDER_LAYERS = [f"stages_{i}_conv{j}" for i in range(9) for j in (1, 2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = adder_resnet20(in_channels=1, width=8)
    train(model, load_digits(), TrainConfig(epochs=1), progress=False)
    path = tmp_path_factory.mktemp("adder_cli") / "adder_resnet20.pt"
    save_checkpoint(model, path, "qcompiler.zoo:adder_resnet20", {"in_channels": 1, "width": 8})
    return path


@pytest.fixture(scope="module")
def run(checkpoint) -> subprocess.CompletedProcess:
    # This checkout's package first: an installed (editable) qcompiler may be another checkout.
    repo = str(Path(__file__).parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-m", "qcompiler.cli", str(checkpoint), *ARGS, "--out", str(checkpoint.parent / "out")],
        capture_output=True, text=True, env=env, cwd=checkpoint.parent, timeout=300,
    )


def test_exits_0_without_errors(run):
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "error" not in run.stderr


def test_prints_float_and_quantized_accuracy(run):
    assert re.search(r"^float accuracy:\s+\d+\.\d\d %$", run.stdout, re.M), run.stdout
    match = re.search(r"^quantized, before QAT:\s+(\d+\.\d\d) %$", run.stdout, re.M)
    assert match and 0.0 <= float(match.group(1)) <= 100.0
    # The header says what was applied: 4-bit adder layers, 8-bit multiply layers and residual-stream readers.
    header = next(line for line in run.stdout.splitlines() if line.startswith("passes: "))
    assert header == "passes: outlier-clamp,adder-groups; W4A4, W4A8, W8A8; first/last at W8A8", header


def test_prints_the_group_cost_table_for_every_adder_layer(run):
    out = run.stdout
    assert "Extra operations of the adder scale groups" in out
    table = out.split("Extra operations of the adder scale groups", 1)[1]
    assert re.search(r"adder layer\s+c\s+g\s+extra FLOPs %\s+\(g-1\)/\(18c\+4\) %", table)
    rows = {}
    for name in ADDER_LAYERS:
        m = re.search(rf"^{name}\s+(\d+)\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)$", table, re.M)
        assert m, f"no group-cost row for {name}"
        rows[name] = tuple(float(v) for v in m.groups())
    c, g, _, closed = rows["stages_0_conv1"]
    assert (c, g) == (8, 4)
    assert closed == pytest.approx(100 * 3 / (18 * 8 + 4), abs=1e-3)
    # the first strided layer: 8 -> 16 channels, 8x8 -> 4x4 (eq. (2) by hand)
    one_scale = 2 * 64 * (8 * 9 + 1) * 16 + 8 * 9 * 16 + 64 * 8 + 16 * 16
    assert rows["stages_3_conv1"] == pytest.approx((8, 4, 100 * 3 * 64 * 8 / one_scale, 100 * 3 / 148), abs=1e-3)
    # the layer table shows the adder layers quantized with group scales
    assert re.search(r"^stages_0_conv1\s+adder2d\s+4\s+4\s+adder-redistribution per-group", out, re.M)


def test_out_folder_holds_module_spec_and_report(run, checkpoint):
    out = checkpoint.parent / "out"
    assert f"wrote {out}" in run.stdout
    assert {"module.pt", "report.txt", "spec.json"} <= {p.name for p in out.iterdir()}
    spec = json.loads((out / "spec.json").read_text())
    assert spec["passes"] == ["outlier-clamp", "adder-groups"] and spec["weight_bits"] == spec["act_bits"] == 4
    assert "adder-redistribution per-group" in (out / "report.txt").read_text()
    module = torch.load(out / "module.pt", weights_only=False)
    assert isinstance(module.get_submodule("stages.0.conv1"), QAdderConv2d)
    with torch.no_grad():
        assert module(load_digits().x_test[:4]).shape == (4, 10)


def test_saved_adder_model_computes_what_the_compiled_one_does(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        AdderConv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    ).eval()
    data = load_digits()
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="outlier-clamp,adder-groups"), calib_data=data.x_train[:128])
    out = c.save(tmp_path / "compiled")
    loaded = torch.load(out / "module.pt", weights_only=False)
    assert isinstance(loaded.get_submodule("3"), QAdderConv2d)
    x = data.x_test[:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), c.module(x), rtol=0, atol=0)
