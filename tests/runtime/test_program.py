"""Program files: a round trip gives identical outputs; a damaged file gives one line of error."""

import copy
import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.runtime import AccumulatorOverflow, Instr, Program, ProgramFileError
from qcompiler.runtime.interpreter import Interpreter


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    return qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(64, 1, 8, 8))


def test_save_load_round_trip_is_identical(compiled, tmp_path):
    program = compiled.lower()
    x = torch.randn(16, 1, 8, 8).numpy()
    path = program.save(tmp_path / "p.npz")
    loaded = Program.load(path)
    assert loaded.instructions == program.instructions and loaded.meta == program.meta
    assert np.array_equal(loaded.run(x), program.run(x))
    with zipfile.ZipFile(path) as z:  # plain arrays and JSON: nothing to unpickle
        assert all(n.endswith(".npy") for n in z.namelist())


def test_float32_requants_give_the_float64_codes():
    """The lowering proves some requants exact in float32; the program gives the same codes without them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 3)).eval()
    program = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(64, 1, 8, 8)).lower()
    proven = [ins.dst for ins in program.instructions if ins.attrs.get("f32")]
    # the requants onto the 4-bit layers' inputs: their accumulators have few possible values.
    # (An 8-bit one was proven too while LSQ's start left 8-bit weight codes small; least-error
    # steps use the whole code range, and that proof no longer goes through.)
    assert {"_3_act", "_6_act"} <= set(proven)
    slow = copy.deepcopy(program)
    for ins in slow.instructions:
        ins.attrs.pop("f32", None)
    x = torch.randn(32, 1, 8, 8).numpy()
    got, kept = Interpreter(program).run(x, keep=tuple(proven))
    ref, ref_kept = Interpreter(slow).run(x, keep=tuple(proven))
    assert np.array_equal(got, ref)
    for name in proven:
        assert kept[name].dtype == np.float32 and np.array_equal(kept[name], ref_kept[name])


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_file_is_one_line_error(compiled, tmp_path):
    path = compiled.lower().save(tmp_path / "p.npz")
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ProgramFileError) as e:
            Program.load(bad)
        assert "not a valid integer program" in _one_line(e)


def test_tampered_file_is_one_line_error(compiled, tmp_path):
    program = compiled.lower()
    path = program.save(tmp_path / "p.npz")
    # change one constant and write the archive again with the old digest
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    name = next(k for k in arrays if k.endswith(".w"))
    arrays[name] = arrays[name] + 1
    bad = tmp_path / "tampered.npz"
    with open(bad, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ProgramFileError) as e:
        Program.load(bad)
    assert "digest" in _one_line(e)
    # an edited instruction with a recomputed-looking but wrong document
    doc = json.loads(arrays["__program__"].tobytes().decode())
    doc["instructions"][1]["op"] = "launch"
    arrays[name] = arrays[name] - 1
    arrays["__program__"] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    with open(bad, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ProgramFileError):
        Program.load(bad)
    with pytest.raises(ProgramFileError) as e:
        Program.load(tmp_path / "missing.npz")
    assert "does not exist" in _one_line(e)


def test_overflow_names_layer_and_channel():
    w = np.zeros((3, 1, 4), dtype=np.int64)
    w[2] = 2**15
    ins = Instr("mac", "y", ("x",), ("w",), {"kind": "conv1d", "stride": [1], "padding": [0, 0], "dilation": [1],
                                             "groups": 1, "exact_f64": True}, layer="conv7")
    program = Program([ins], {"w": w}, ("x",), ("y",))
    x = np.full((1, 1, 4), 2**15, dtype=np.int64)  # 4 * 2^30 = 2^32 does not fit 32 bits
    with pytest.raises(AccumulatorOverflow, match="layer 'conv7'.*channel 2"):
        program.run(x)
    it = Interpreter(program, on_overflow="record")
    it.run(x)
    assert [(o.layer, o.channel) for o in it.overflows] == [("conv7", 2)]


@pytest.mark.parametrize("passes", ["asq,post", "outlier-clamp,adder-groups"])
def test_round_trip_of_asq_post_and_adder_programs(passes, tmp_path):
    from qcompiler.data import load_digits
    from qcompiler.zoo import adder_resnet20, resnet20

    data = load_digits()
    torch.manual_seed(0)
    model = adder_resnet20(in_channels=1, width=4) if "adder" in passes else resnet20(in_channels=1, width=4)
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=4, act_bits=4), calib_data=data)
    program = c.lower()
    x = data.x_test[:20].numpy()
    assert np.array_equal(Program.load(program.save(tmp_path / "p.npz")).run(x), program.run(x))
