"""Each instruction against a reference formula, and the one-table ISA contract."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcompiler import numerics
from qcompiler.quantizers.asq import BETA_BOUND, adapter_forward
from qcompiler.runtime.interpreter import Interpreter, sad_direct
from qcompiler.runtime.isa import COST_KINDS, ISA, Instr, isa_table
from qcompiler.runtime.program import Program


def run1(op, srcs, consts=None, attrs=None, inputs=None):
    """Run one instruction on the named input arrays."""
    inputs = inputs or {}
    names = tuple(inputs)
    ins = [Instr("concat", "__x", names, (), {"axis": 0})] if len(names) > 1 else []
    prog = Program([Instr(op, "y", tuple(srcs), tuple(consts or {}), attrs or {}, "layer")], dict(consts or {}), names[:1], ("y",))
    it = Interpreter(prog)
    env = dict(inputs)
    return getattr(it, f"op_{op}")(prog.instructions[0], env)


def test_every_declared_op_has_an_interpreter_method_and_a_docs_row():
    table = isa_table()
    for name, decl in ISA.items():
        assert hasattr(Interpreter, f"op_{name}"), name
        assert f"`{name}`" in table
        assert decl.cost in COST_KINDS
    assert {m[3:] for m in dir(Interpreter) if m.startswith("op_")} == set(ISA)


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (4, 1, 2, 2), (1, 2, 1, 2)])
def test_mac_conv2d_equals_exact_convolution(groups, stride, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.integers(-8, 8, size=(3, 4, 7, 6))
    w = rng.integers(-8, 8, size=(8, 4 // groups, 3, 2))
    attrs = {"kind": "conv2d", "stride": [stride] * 2, "padding": [padding] * 4, "dilation": [dilation] * 2,
             "groups": groups}
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=stride, padding=padding,
                    dilation=dilation, groups=groups).long().numpy()
    for f32, f64 in ((True, True), (False, True), (False, False)):  # float32, float64 and int64 paths agree
        got = run1("mac", ["x"], {"w": w}, attrs | {"exact_f32": f32, "exact_f64": f64}, {"x": x})
        assert got.dtype == (np.float32 if f32 else np.float64 if f64 else np.int64) and np.array_equal(got, want)


@pytest.mark.parametrize("groups,padding,dilation", [(1, 1, 1), (2, 2, 2), (4, 1, 1)])
def test_mac_same_size_convolutions_and_batch_chunks(groups, padding, dilation, monkeypatch):
    """Stride 1 keeping the size takes im2col's flat-shift path; small chunks split the batch."""
    from qcompiler.runtime import interpreter

    rng = np.random.default_rng(7)
    x = rng.integers(0, 16, size=(5, 4, 6, 7))
    w = rng.integers(-8, 8, size=(8, 4 // groups, 3, 3))
    attrs = {"kind": "conv2d", "stride": [1, 1], "padding": [padding] * 4, "dilation": [dilation] * 2,
             "groups": groups, "exact_f32": True, "exact_f64": True}
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), padding=padding,
                    dilation=dilation, groups=groups).long().numpy()
    # whole batch; 3 images per chunk (5 = 3 + 2); 2 per chunk in the row-stacked path (ungrouped)
    for chunk in (1 << 20, 3 * 4 * 9 * 42, 2 * 4 * 3 * 42):
        monkeypatch.setattr(interpreter, "COLS_CHUNK", chunk)
        got = run1("mac", ["x"], {"w": w}, attrs, {"x": x})
        assert np.array_equal(got, want)


@pytest.mark.parametrize("kernel,padding,dilation", [((2, 2), (1, 1), (2, 2)), ((3, 1), (1, 0), (1, 1)), ((3, 3), (3, 1), (3, 1))])
def test_mac_row_stacked_convolutions(kernel, padding, dilation, monkeypatch):
    """Ungrouped same-size convolutions stack the first axis's offsets into the matmul's rows:
    offsets with no zero shift (the output is then zeroed first), shifts past the image, one-wide kernels."""
    from qcompiler.runtime import interpreter

    rng = np.random.default_rng(11)
    x = rng.integers(0, 16, size=(3, 4, 5, 6))
    w = rng.integers(-8, 8, size=(6, 4, *kernel))
    attrs = {"kind": "conv2d", "stride": [1, 1], "padding": [padding[0]] * 2 + [padding[1]] * 2,
             "dilation": list(dilation), "groups": 1, "exact_f32": True, "exact_f64": True}
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), padding=padding,
                    dilation=dilation).long().numpy()
    assert want.shape[2:] == x.shape[2:]
    for chunk in (1 << 20, 100):  # whole batch; one image per chunk
        monkeypatch.setattr(interpreter, "COLS_CHUNK", chunk)
        assert np.array_equal(run1("mac", ["x"], {"w": w}, attrs, {"x": x}), want)


@pytest.mark.parametrize("size,kernel,stride,padding,dilation", [
    ((8, 8), (3, 3), (2, 2), (1, 1), (1, 1)),  # ResNet's downsampling 3x3
    ((7, 9), (3, 3), (2, 2), (1, 1), (1, 1)),  # odd sizes: phase images shorter than the output grid
    ((8, 8), (1, 1), (2, 2), (0, 0), (1, 1)),  # the 1x1 shortcut
    ((14, 14), (7, 7), (2, 2), (3, 3), (1, 1)),  # an ImageNet stem
    ((9, 10), (3, 2), (3, 2), (2, 0), (2, 1)),  # stride 3, dilation, a tap past the end
    ((6, 6), (3, 3), (2, 1), (3, 1), (1, 1)),  # over-padded: output longer than any phase
])
def test_mac_strided_convolutions_through_phase_images(size, kernel, stride, padding, dilation, monkeypatch):
    """Strided convolutions whose phase images fit the output grid take the flat-shift im2col."""
    from qcompiler.runtime import interpreter

    rng = np.random.default_rng(5)
    x = rng.integers(0, 16, size=(3, 4, *size))
    w = rng.integers(-8, 8, size=(6, 4, *kernel))
    attrs = {"kind": "conv2d", "stride": list(stride), "padding": [padding[0]] * 2 + [padding[1]] * 2,
             "dilation": list(dilation), "groups": 1, "exact_f32": True, "exact_f64": True}
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=stride, padding=padding,
                    dilation=dilation).long().numpy()
    assert interpreter._phase_taps(size, kernel, attrs, list(want.shape[2:])) is not None
    for chunk in (1 << 20, 100):  # whole batch; one image per chunk
        monkeypatch.setattr(interpreter, "COLS_CHUNK", chunk)
        assert np.array_equal(run1("mac", ["x"], {"w": w}, attrs, {"x": x}), want)


def test_phase_taps_refuse_a_phase_longer_than_the_output():
    """A valid (unpadded) stride-2 convolution reads past the output grid of a phase image: generic path."""
    from qcompiler.runtime import interpreter

    attrs = {"stride": [2], "padding": [0, 0], "dilation": [1]}
    assert interpreter._phase_taps((8,), (3,), attrs, [3]) is None
    assert interpreter._phase_taps((8,), (3,), dict(attrs, padding=[1, 1]), [4]) == [[(1, -1), (0, 0), (1, 0)]]


def test_mac_conv1d_asymmetric_padding_and_linear():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 16, size=(2, 3, 9))
    w = rng.integers(-7, 8, size=(5, 3, 4))
    got = run1("mac", ["x"], {"w": w}, {"kind": "conv1d", "stride": [1], "padding": [1, 2], "dilation": [1],
                                        "groups": 1, "exact_f64": True}, {"x": x})
    want = F.conv1d(F.pad(torch.from_numpy(x).double(), (1, 2)), torch.from_numpy(w).double()).long().numpy()
    assert np.array_equal(got, want)
    x2, w2 = rng.integers(0, 256, size=(4, 10)), rng.integers(-128, 128, size=(3, 10))
    assert np.array_equal(run1("mac", ["x"], {"w": w2}, {"kind": "linear", "exact_f64": True}, {"x": x2}), x2 @ w2.T)


def test_pooling_relu_concat_reshape():
    rng = np.random.default_rng(2)
    x = rng.integers(-8, 8, size=(2, 3, 6, 6))
    win = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1, 1, 1], "dilation": [1, 1]}
    want_max = F.max_pool2d(torch.from_numpy(x).double(), 3, 2, 1).long().numpy()
    assert np.array_equal(run1("maxpool", ["x"], None, win | {"pad_value": -8}, {"x": x}), want_max)
    want_sum = (F.avg_pool2d(torch.from_numpy(x).double(), 3, 2, 1, count_include_pad=True) * 9).round().long().numpy()
    assert np.array_equal(run1("sumpool", ["x"], None, win, {"x": x}), want_sum)
    assert np.array_equal(run1("relu", ["x"], None, {}, {"x": x}), np.maximum(x, 0))
    y = rng.integers(0, 4, size=(2, 1, 6, 6))
    assert np.array_equal(run1("concat", ["x", "z"], None, {"axis": 1}, {"x": x, "z": y}), np.concatenate([x, y], 1))
    assert run1("reshape", ["x"], None, {"shape": [108]}, {"x": x}).shape == (2, 108)


def test_quantize_is_numerics_quantize_codes():
    x = np.array([[-1.3, 0.24, 0.25, 0.375, 9.0]])
    got = run1("quantize", ["x"], None, {"step": 0.25, "qmin": -8, "qmax": 7, "factor": None}, {"x": x})
    assert np.array_equal(got, numerics.quantize_codes(x, 0.25, -8, 7))


def test_asq_beta_equals_adapter_forward():
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(1, 4, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)
    x = np.random.default_rng(3).integers(0, 16, size=(5, 8, 3, 3))
    consts = {"w1": w1.numpy(), "b1": b1.numpy(), "w2": w2.numpy(), "b2": b2.numpy(), "s": np.array(0.1), "o": np.zeros(())}
    got = run1("asq_beta", ["x"], consts, {"beta_bound": BETA_BOUND, "terms": [["x", None]], "clip": [None, None]}, {"x": x})
    pooled = torch.from_numpy(x * 0.1).flatten(2).mean(-1)
    want = adapter_forward(pooled, w1, b1, w2, b2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_dequant_is_scale_times_codes_plus_offset():
    x = np.array([[3, -2], [0, 7]])
    got = run1("dequant", ["x"], {"s": np.array([0.5, 0.25]), "o": np.array([1.0, -1.0])},
               {"terms": [["x", None]], "clip": [None, None]}, {"x": x})
    np.testing.assert_array_equal(got, x * np.array([0.5, 0.25]) + np.array([1.0, -1.0]))


@pytest.mark.parametrize("grid", ["pot", "post"])
def test_shift_acc_is_shifts_and_table_lookups(grid):
    """Reference: each product written out as a shift (POT) or shift + LUT[|x|] (POST's odd exponents)."""
    rng = np.random.default_rng(4)
    x = rng.integers(-15, 16, size=(2, 3, 5))
    sign = rng.integers(-1, 2, size=(4, 3, 2))
    shift = rng.integers(0, 5, size=(4, 3, 2)) * (sign != 0)
    odd = (rng.integers(0, 2, size=(4, 3, 2)) == 1) & (sign != 0) if grid == "post" else np.zeros_like(sign, bool)
    table = numerics.post_table(15)
    attrs = {"kind": "conv1d", "stride": [1], "padding": [0, 0], "dilation": [1], "groups": 1, "exact_f64": True,
             "grid": grid, "post_shift": numerics.POST_SHIFT}
    consts = {"sign": sign, "shift": shift} | ({"odd": odd, "lut": table} if grid == "post" else {})
    got = run1("shift_acc", ["x"], consts, attrs, {"x": x})
    want = np.zeros((2, 4, 4), dtype=object)
    p = numerics.POST_SHIFT if grid == "post" else 0
    for n in range(2):
        for o in range(4):
            for t in range(4):
                acc = 0
                for c in range(3):
                    for k in range(2):
                        a = int(x[n, c, t + k])
                        if sign[o, c, k] == 0:
                            continue
                        prod = int(table[abs(a)]) * (1 if a >= 0 else -1) if odd[o, c, k] else a << p
                        acc += int(sign[o, c, k]) * (prod << int(shift[o, c, k]))
                want[n, o, t] = acc
    assert np.array_equal(got, want.astype(np.int64))


@pytest.mark.parametrize("groups", [1, 2])
def test_sad_is_the_adder_layers_l1_distance(groups):
    from qcompiler.nn.adder import adder_conv2d

    rng = np.random.default_rng(5)
    a = [rng.integers(0, 16, size=(2, 4, 5, 5)) for _ in range(2)]  # two scale groups' codes
    w = rng.integers(-14, 15, size=(6, 4 // groups, 3, 3))
    group = np.array([0, 1, 1, 0, 1, 0])
    attrs = {"kind": "adder2d", "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": groups}
    got = run1("sad", ["a0", "a1"], {"w": w, "g": group}, attrs, {"a0": a[0], "a1": a[1]})
    direct = sad_direct(a, w, group, attrs)  # the broadcast reference the matmul form replaces
    for o in range(6):
        want = -adder_conv2d(torch.from_numpy(a[group[o]]), torch.from_numpy(w), 1, 1, 1, groups)[:, o]
        assert np.array_equal(got[:, o], want.numpy()) and np.array_equal(direct[:, o], want.numpy())


def test_permute_index_and_adaptive_sumpool():
    rng = np.random.default_rng(6)
    x = rng.integers(-8, 8, size=(2, 3, 5, 7))
    assert np.array_equal(run1("permute", ["x"], None, {"perm": [2, 3, 1]}, {"x": x}), x.transpose(0, 2, 3, 1))
    got = run1("index", ["x"], None, {"index": [[1, None, None], 2, [None, None, 2]]}, {"x": x})
    assert np.array_equal(got, x[:, 1:, 2, ::2])
    from qcompiler.runtime.interpreter import adaptive_windows

    windows = [adaptive_windows(5, 3), adaptive_windows(7, 4)]  # overlapping windows of 2 and 3
    got = run1("sumpool", ["x"], None, {"windows": windows, "kernel": [2, 3]}, {"x": x})
    sums = np.array([[x[:, :, a:b, c:d].sum(axis=(2, 3)) for c, d in windows[1]] for a, b in windows[0]])
    assert np.array_equal(got, sums.transpose(2, 3, 0, 1))
