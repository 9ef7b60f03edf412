"""ONNX export (custom form): valid files, deterministic bytes, parity with the fake-quant module, op bodies."""

import dataclasses
import functools

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.data import load_digits
from qcompiler.errors import QCompileError
from qcompiler.numerics import int_range
from qcompiler.quantizers.adder import QAdderConv2d
from qcompiler.quantizers.asq import ASQQuantizer
from qcompiler.quantizers.power_grid import PowerGridQuantizer
from qcompiler.quantizers.uniform import UniformQuantizer
from qcompiler.runtime import onnx_ops
from qcompiler.runtime.onnx_export import ExportError, onnx_parity, session, to_onnx
from qcompiler.nn import exact
from qcompiler.nn.adder import AdderConv2d
from qcompiler.zoo import adder_resnet20, plain_cnn, resnet20

MODELS = {
    "resnet20": lambda: resnet20(in_channels=1, width=4),
    "plain_cnn": lambda: plain_cnn(width=4),
    "adder_resnet20": lambda: adder_resnet20(in_channels=1, width=4),
}
SCHEMES = {
    "resnet20": ["lsq", "lsq,pot", "lsq,post", "asq", "asq,post"],
    "plain_cnn": ["lsq", "lsq,pot", "lsq,post", "asq", "asq,post"],
    "adder_resnet20": ["outlier-clamp,adder-groups", "adder-shared"],
}
CASES = [(m, p) for m in MODELS for p in SCHEMES[m]]

# Cases that missed 1e-4 before the module computed its layers on integer codes in eval mode
# (qcompiler.nn.exact): ORT's convolution (MLAS) and torch's (oneDNN) summed float32 products in
# different orders, and a value within an ulp of a quantizer's tie got a different code on each
# side. Sums of integer codes are exact in any order, so these now agree bit for bit. Parity runs
# the file as written, without onnxruntime's folding rewrites (onnx_export.REASSOCIATING).
# 8-bit POT/POST layers sum bands of their integer weights (exact.band_plan): no float formula left.
FORMER_NEAR_TIE = [("resnet20", "lsq", 2), ("resnet20", "lsq", 4), ("resnet20", "lsq", 8), ("resnet20", "lsq,pot", 8),
                   ("resnet20", "lsq,post", 8), ("resnet20", "asq", 8)]
from small_models import Upsampler


@functools.lru_cache(maxsize=None)
def compiled(model: str, passes: str, bits: int):
    torch.manual_seed(0)
    c = qcompiler.compile(MODELS[model](), qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits),
                          calib_data=load_digits())
    c.freeze()
    return c


def run(model: onnx.ModelProto, **feeds) -> np.ndarray:
    return session(model).run(None, feeds)[0]


@pytest.mark.parametrize("model,passes", CASES)
def test_checker_and_shape_inference(model, passes):
    m = to_onnx(compiled(model, passes, 4).module)
    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
    shaped = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    fx_names = {n.name for n in compiled(model, passes, 4).module.graph.nodes} | {"output"}
    for node in inferred.graph.node:
        for out in node.output:
            t = shaped[out].type.tensor_type
            assert t.HasField("shape"), out
            dims = t.shape.dim
            assert all(d.HasField("dim_value") or d.HasField("dim_param") for d in dims), out
            if out in fx_names:  # activations: a dynamic batch, static per-sample shape
                assert dims[0].dim_param == "N" and all(d.HasField("dim_value") for d in dims[1:]), out
    assert m.opset_import[0].version == onnx_ops.OPSET


def test_node_names_follow_the_fx_node_names():
    c = compiled("resnet20", "asq,post", 4)
    m = to_onnx(c.module)
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)
    # every quantizer, layer and join of the IR dump is an ONNX node of the same name
    for node in c.module.graph.nodes:
        if node.op == "call_module" or node.meta.get("qc.join") is not None:
            assert any(n == node.name or n.startswith(node.name + ".") for n in names), node.name


def test_reexport_is_byte_identical_and_atomic(tmp_path):
    c = compiled("resnet20", "asq,post", 4)
    a = c.export_onnx(tmp_path / "a.onnx")
    b = c.export_onnx(tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    c.export_onnx(tmp_path / "a.onnx")  # replacing an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temporary file left


def test_low_bit_weights_are_integer_codes():
    m = to_onnx(compiled("resnet20", "lsq", 4).module)
    kinds = {i.name: i.data_type for i in m.graph.initializer}
    assert kinds["stages_0_conv1.codes"] == onnx.TensorProto.INT4
    assert kinds["stem_0.codes"] == onnx.TensorProto.INT8  # pinned at 8 bits
    post = to_onnx(compiled("resnet20", "lsq,post", 4).module)
    ops = {n.op_type for n in post.graph.node} | {n.op_type for f in post.functions for n in f.node}
    assert "PowerGridDecode" in ops and "Gather" in ops and "Pow" not in ops


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("model,passes", CASES)
def test_parity_with_fake_quant_module(model, passes, bits):
    from qcompiler.runtime.onnx_export import FLOAT_LAYERS

    c = compiled(model, passes, bits)
    m = to_onnx(c.module)
    parity = onnx_parity(c, m, load_digits().x_test)
    assert parity.classes_agree == 1.0, parity.text()
    if FLOAT_LAYERS not in {p.key for p in m.metadata_props}:
        assert parity.max_abs_diff <= 1e-4 * max(parity.output_range, 1e-6), parity.text()
        return
    # Layers listed as float formula (partial sums past 2^24) sum in float32 in each runtime's
    # own order: a value within an ulp of a tie may take the other code in a sample or two.
    assert samples_differing(c, m, load_digits().x_test) <= 0.01, parity.text()


def samples_differing(c, m: onnx.ModelProto, x: torch.Tensor) -> float:
    """The fraction of samples whose output differs at all between onnxruntime and the module."""
    sess = session(m, None, as_written=True)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = c.module.eval()(x).numpy()
    return float((np.abs(got - want).max(axis=1) > 0).mean())


@pytest.mark.parametrize("model,passes,bits", FORMER_NEAR_TIE)
def test_former_near_ties_agree_bit_for_bit(model, passes, bits):
    c = compiled(model, passes, bits)
    parity = onnx_parity(c, to_onnx(c.module), load_digits().x_test)
    assert parity.max_abs_diff == 0.0, parity.text()


def test_verify_onnx_api(tmp_path):
    c = compiled("plain_cnn", "lsq,post", 4)
    parity = c.verify_onnx(c.export_onnx(tmp_path / "m.onnx"), load_digits().x_test[:64])
    assert parity.ok() and parity.samples == 64 and "classes agree 100.00 %" in parity.text()


# --------------------------------------------------------------------------- function bodies on edge values


@pytest.mark.parametrize("bits,signed", [(2, False), (2, True), (4, True), (8, False), (8, True)])
def test_uniform_quantize_body_matches_lsq(bits, signed):
    q = UniformQuantizer(bits, signed)
    q.step.data.fill_(0.25)
    qmin, qmax = int_range(bits, signed)
    ties = (np.arange(qmin - 2, qmax + 3) + 0.5) * 0.25  # every .5 tie, beyond both clamp limits
    x = np.concatenate([ties, [0.0, -0.0, qmin * 0.25, qmax * 0.25, 1e9, -1e9]]).astype(np.float32)
    m = onnx_ops.op_model("UniformQuantize", {"x": x, "step": np.float32(0.25)}, qmin=qmin, qmax=qmax)
    got = run(m, x=x)
    with torch.no_grad():
        want = q(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, onnx_ops.reference("UniformQuantize", x, 0.25, qmin=qmin, qmax=qmax))


def test_asq_quantize_body_matches_asq_quantizer():
    torch.manual_seed(0)
    q = ASQQuantizer(4, signed=True, channels=8, generator=torch.Generator().manual_seed(1)).eval()
    q.step.data.fill_(0.1)
    nn.init.normal_(q.adapter.fc2.weight, std=0.5)  # betas well away from 1
    x = torch.randn(5, 8, 4, 4)
    x[0] = 0.0  # a zero sample
    x[1, :, 0, 0] = 50.0  # clamp limits
    ins = {"x": x.numpy(), "step": np.float32(0.1)} | {k: v.detach().numpy() for k, v in zip(
        ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), q.adapter.weights())}
    m = onnx_ops.op_model("AsqQuantize", ins, qmin=q.qmin, qmax=q.qmax)
    got = run(m, x=ins["x"])
    with torch.no_grad():
        want, step = q(x).numpy(), q.sample_step(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.rint(got / step), np.rint(want / step))  # the same codes


@pytest.mark.parametrize("grid", ["pot", "post"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_power_grid_decode_body_matches_quantizer(grid, bits):
    from qcompiler.runtime.onnx_export import _int_codes, _signed_levels

    k = 2 ** (bits - 1) - 1
    q = PowerGridQuantizer(bits, grid, channels=2)
    q.alpha.data.copy_(torch.tensor([0.75, 1.5]))
    codes = torch.arange(-k, k + 1).repeat(2, 1)  # every code: zero, the largest and the smallest level
    w = q.decode(codes)
    with torch.no_grad():
        want = q(w).numpy()  # levels project onto themselves
    assert torch.equal(q.codes(w), codes)
    rec = ir.WeightCodes(grid, bits, -k, k, codes, q.alpha.detach(), None, base=q.base,
                         post_mantissa=0xB504F3 if grid == "post" else 0, post_shift=24 if grid == "post" else 0)
    ins = {"codes": _int_codes(codes.numpy(), bits), "table": _signed_levels(rec, k),
           "alpha": q.alpha.detach().numpy().reshape(2, 1)}
    got = run(onnx_ops.op_model("PowerGridDecode", ins, dynamic=(), levels=k))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, onnx_ops.reference("PowerGridDecode", codes.numpy(), ins["table"], ins["alpha"], levels=k))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_adder_conv_body_matches_quantized_adder(bits):
    torch.manual_seed(0)
    layer = AdderConv2d(3, 5, kernel_size=3, stride=1, padding=1, bias=False)
    step = 0.125
    q = QAdderConv2d.from_float(layer, torch.zeros(5), torch.tensor([step]), bits, bits)
    qmax = 2**bits - 1
    x = (torch.randint(0, 2 * qmax + 4, (2, 3, 6, 6)).float() * 0.5 + 0.5) * step  # .5 ties and values past qmax
    x[0, 0] = 0.0
    w = (q.weight_codes() * q.weight_step_ratio).numpy()
    at = dict(qmax=qmax, kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    got = run(onnx_ops.op_model("AdderConv2d", {"x": x.numpy(), "step": np.float32(step), "w": w}, **at), x=x.numpy())
    with torch.no_grad():
        want = q.eval()(x).numpy()
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- errors


def test_non_positive_step_is_refused():
    c = compiled("plain_cnn", "lsq", 4)
    gm = c.module
    node = next(n for n in gm.graph.nodes if ir.STEP in n.meta)
    old = node.meta[ir.STEP]
    try:
        for bad in (0.0, -0.5, float("nan")):
            node.meta[ir.STEP] = dataclasses.replace(old, step=bad)
            with pytest.raises(ExportError, match=f"{node.name}.*must be positive and finite") as err:
                to_onnx(gm)
            assert isinstance(err.value, QCompileError) and "\n" not in str(err.value)
    finally:
        node.meta[ir.STEP] = old


def test_unknown_format_is_refused():
    with pytest.raises(ExportError, match="custom"):
        to_onnx(compiled("plain_cnn", "lsq", 4).module, "tflite")


# --------------------------------------------------------------------------- QDQ form


def optimized_ops(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    """The op counts of the graph onnxruntime runs after its optimizers (QDQ fusion included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    session(model, opts)
    ops: dict[str, int] = {}
    for n in onnx.load(opts.optimized_model_filepath).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_qdq_lsq8_runs_on_integer_kernels_and_agrees(tmp_path):
    c = compiled("resnet20", "lsq", 8)
    m = to_onnx(c.module, "qdq")
    onnx.checker.check_model(m, full_check=True)
    assert not {"BatchNormalization", "Relu"} & {n.op_type for n in m.graph.node}  # folded / clamped by the quantizer
    ops = optimized_ops(m, tmp_path)
    layers = len(ir.compute_layers(c.module))
    assert ops.get("QLinearConv", 0) + ops.get("QGemm", 0) == layers, ops
    assert ops.get("QLinearAdd", 0) == 9 and "Conv" not in ops and "Add" not in ops, ops
    parity = onnx_parity(c, m, load_digits().x_test)
    assert parity.classes_agree >= 0.995, parity.text()


def test_qdq_int32_bias_is_the_modules_integer_bias():
    """Batch norms with a bias (as after training): QLinearConv adds the folded bias as INT32 on the
    accumulator grid, and the deployed module adds the same integers (exact.integer_bias)."""
    import copy

    c = copy.copy(compiled("resnet20", "lsq", 8))
    c.module = copy.deepcopy(c.module)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in c.module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    c.freeze()
    m = to_onnx(c.module, "qdq")
    # A bias rounded differently would move every sample; QLinearConv's own float32 requantization
    # multiplier may still send a value within an ulp of a tie to the other code (onnx_qdq's
    # docstring), which moves a sample or two: the rest must agree exactly.
    assert onnx_parity(c, m, load_digits().x_test).classes_agree == 1.0
    assert samples_differing(c, m, load_digits().x_test) <= 0.01


def test_float_formula_layers_are_listed_in_the_metadata():
    from qcompiler.runtime.onnx_export import FLOAT_LAYERS

    plain = to_onnx(compiled("resnet20", "lsq", 4).module)
    assert FLOAT_LAYERS not in {p.key for p in plain.metadata_props}  # every layer on integer codes
    # 8-bit POT reaches 2^31 per weight: the ungrouped layers sum bands of bits over channel ranges,
    # but the grouped one cannot be cut into channel ranges and keeps the float formula
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1, groups=2),
                          nn.ReLU(), nn.Conv2d(256, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq,pot", weight_bits=8, act_bits=8),
                          calib_data=torch.randn(64, 1, 8, 8))
    c.freeze()
    proto = to_onnx(c.module)
    listed = {p.key: p.value for p in proto.metadata_props}.get(FLOAT_LAYERS, "")
    assert listed == "_2"
    parity = onnx_parity(c, proto, torch.randn(64, 1, 8, 8))
    assert parity.classes_agree == 1.0, parity.text()


def test_8bit_power_grids_compute_on_integer_codes_in_weight_bands():
    """8-bit POT/POST weights reach 2^31: cut into bands of bits, every layer stays on integer codes."""
    from qcompiler.runtime.onnx_export import FLOAT_LAYERS

    for passes in ("lsq,pot", "lsq,post", "asq,post"):
        c = compiled("resnet20", passes, 8)
        proto = to_onnx(c.module)
        assert FLOAT_LAYERS not in {p.key for p in proto.metadata_props}, passes
        assert any(n.op_type == "Mod" for n in proto.graph.node)  # the bands, cut from the decoded weights
        parity = onnx_parity(c, proto, load_digits().x_test)
        assert parity.max_abs_diff == 0.0 and parity.classes_agree == 1.0, parity.text()


@pytest.mark.parametrize("bits", [2, 4])
def test_qdq_narrow_lsq_agrees(bits):
    c = compiled("plain_cnn", "lsq", bits)
    parity = onnx_parity(c, to_onnx(c.module, "qdq"), load_digits().x_test)
    assert parity.classes_agree >= 0.995, parity.text()


def test_qdq_negative_gamma_flips_codes_or_keeps_a_negative_step():
    import copy

    from qcompiler.runtime.onnx_qdq import fold_sign

    f = fold_sign(np.array([[3, -128], [5, -7]]), np.array([0.5, 0.25]), np.array([-1.0, -2.0]), -128)
    assert f.codes.tolist() == [[3, -128], [-5, 7]] and f.scale.tolist() == [-0.5, 0.5] and f.negative_steps == 1
    c = copy.copy(compiled("resnet20", "lsq", 8))
    c.module = copy.deepcopy(c.module)
    with torch.no_grad():
        for m in c.module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[::2] *= -1  # every other channel negative
        node = next(n for n in c.module.graph.nodes if n.name == "stages_0_conv1")
        conv = c.module.get_submodule(node.target)
        conv.weight[0, 0, 0, 0] = -1e3  # clamps to code -128 in channel 0, whose gamma is negative
    c.freeze()
    assert node.meta[ir.CODES].codes[0].min() == -128
    m = to_onnx(c.module, "qdq")
    scales = [numpy_helper_to_array(i) for i in m.graph.initializer if i.name.endswith("conv1.scale")]
    assert any((s < 0).any() for s in scales) and all((s > 0).any() for s in scales)  # both ways taken
    parity = onnx_parity(c, m, load_digits().x_test)
    assert parity.classes_agree >= 0.995, parity.text()


def numpy_helper_to_array(t: onnx.TensorProto) -> np.ndarray:
    return onnx.numpy_helper.to_array(t)


@pytest.mark.parametrize("model,passes,what", [
    ("resnet20", "asq", "per-sample step"), ("resnet20", "lsq,post", "post weights"),
    ("adder_resnet20", "outlier-clamp,adder-groups", "adder")])
def test_qdq_refuses_what_it_cannot_express(model, passes, what):
    with pytest.raises(ExportError, match=f"{what}.*custom form") as err:
        to_onnx(compiled(model, passes, 4).module, "qdq")
    assert "\n" not in str(err.value)


def test_4bit_resnet20_file_is_under_0_15x_the_float_file():
    """ResNet-20 at the zoo's default width: weight codes alone are 0.125x of float32."""
    import io
    import warnings

    torch.manual_seed(0)
    c = qcompiler.compile(resnet20(), qcompiler.QuantSpec(passes="lsq", weight_bits=4, act_bits=4),
                          calib_data=torch.randn(16, 3, 32, 32))
    c.freeze()
    ours = len(to_onnx(c.module).SerializeToString())
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet20().eval(), torch.randn(1, 3, 32, 32), f, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    assert ours <= 0.15 * len(f.getvalue()), (ours, len(f.getvalue()))


UPSAMPLERS = {
    "2d": (Upsampler, (2, 6, 6)),
    "1d": (lambda: nn.Sequential(nn.Conv1d(2, 6, 3), nn.ReLU(), nn.ConvTranspose1d(6, 3, 4, stride=2, bias=False)), (2, 12)),
}


@functools.lru_cache(maxsize=None)
def compiled_upsampler(name: str, passes: str, bits: int = 8):
    make, shape = UPSAMPLERS[name]
    torch.manual_seed(0)
    c = qcompiler.compile(make().eval(), qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits),
                          calib_data=torch.randn(64, *shape))
    c.freeze()
    return c


@pytest.mark.parametrize("name", UPSAMPLERS)
@pytest.mark.parametrize("passes,fmt", [("lsq", "custom"), ("lsq,pot", "custom"), ("lsq,post", "custom"), ("asq", "custom"),
                                        ("lsq", "qdq")])
def test_transposed_convs_export_as_conv_transpose_and_match_the_module(name, passes, fmt):
    c = compiled_upsampler(name, passes)
    model = to_onnx(c.module, fmt)
    onnx.checker.check_model(model, full_check=True)
    transposed = sum(isinstance(m, nn.modules.conv._ConvTransposeNd) for m in c.module.modules())
    assert sum(n.op_type == "ConvTranspose" for n in model.graph.node) >= transposed
    torch.manual_seed(5)
    parity = onnx_parity(c, model, torch.randn(32, *UPSAMPLERS[name][1]))
    # the custom form computes the module's integer form op for op; QDQ runs the transposed convs in
    # float on dequantized weights with a float bias (not fused), one float32 rounding away
    assert parity.max_abs_diff <= (0.0 if fmt == "custom" else 1e-5), parity


def test_embedding_exports_as_gather_on_the_decoded_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), nn.Linear(8 * 5, 3)).eval()
    x = torch.randint(0, 30, (64, 5))
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8), calib_data=x)
    c.freeze()
    for fmt in ("custom", "qdq"):
        m = to_onnx(c.module, fmt)
        onnx.checker.check_model(m, full_check=True)
        assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert "Gather" in [n.op_type for n in m.graph.node]
        assert onnx_parity(c, m, x).max_abs_diff == 0.0


@pytest.mark.parametrize("name", UPSAMPLERS)
@pytest.mark.parametrize("passes,bits", [("lsq", 8), ("lsq", 4), ("lsq,post", 4), ("asq", 8)])
def test_transposed_convs_lower_to_the_stride_one_conv_they_equal(name, passes, bits):
    """Grouped, with output padding, dilated, non-square, 1-d: the input spread by an ``index``
    gather (stride - 1 zeros between positions, d(k - 1) - p around, position -1 a zero), then a
    plain conv of the flipped weight; every code agrees with the module."""
    c = compiled_upsampler(name, passes, bits)
    program = c.lower()
    spreads = [i for i in program.instructions if i.dst.endswith(".spread")]
    transposed = [n for n, m in c.module.named_modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    assert len(spreads) == len(transposed) and all(-1 in a["positions"] for i in spreads for a in i.attrs["index"][1:])
    assert not any("transpose" in str(i.attrs.get("kind")) for i in program.instructions)
    torch.manual_seed(5)
    x = torch.randn(32, *UPSAMPLERS[name][1]).numpy()
    report = program.verify(c, x)
    assert report.ok(identical=1.0, max_diff=0), report.text()
    # the cost counts the layer's own multiply-accumulates, not products with the spread's zeros
    if passes == "lsq":  # uniform weights: one multiply per multiply-accumulate
        mults = {lc.layer: sum(v for k, v in lc.counts.items() if k.startswith("mult")) for lc in program.costs(x).layers}
        layers = [n for n in c.module.graph.nodes if n.op == "call_module" and n.target in transposed]
        assert len(layers) == len(transposed)
        for node in layers:
            assert mults[node.name] == ir.get(node, ir.LAYER, ir.LayerInfo).macs


class _SpatialMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class _TokenMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):  # (batch, tokens, features): pool the tokens
        return self.head(torch.mean(torch.relu(self.embed(x)), dim=1, keepdim=False))


@pytest.mark.parametrize("make,shape", [(_SpatialMean, (1, 8, 8)), (_TokenMean, (6, 8))])
def test_mean_calls_export_and_match_the_module_bit_for_bit(make, shape):
    """``x.mean(dims)`` / ``torch.mean(x, dim)`` run in float64 and round once in the deployed module
    (exact.mean), so the file's float64 ReduceMean gives the same bits."""
    torch.manual_seed(0)
    c = qcompiler.compile(make().eval(), qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8),
                          calib_data=torch.randn(64, *shape))
    c.freeze()
    assert any(n.target is exact.mean for n in c.module.graph.nodes)
    model = to_onnx(c.module)
    onnx.checker.check_model(model, full_check=True)
    assert "ReduceMean" in [n.op_type for n in model.graph.node]
    x = torch.randn(128, *shape)
    assert onnx_parity(c, model, x).max_abs_diff == 0.0
    if make is _SpatialMean:  # a spatial mean is a whole-axis sumpool in the integer program
        assert c.lower().verify(c, x).ok()


@pytest.mark.parametrize("pooled,out", [(1, 7), (2, 4), (2, 7), (8, 3), (8, (3, 5)), (4, (7, 1))])
def test_adaptive_pooling_with_uneven_windows_sums_in_torchs_order(pooled, out):
    """Windows of different sizes: VGG's AdaptiveAvgPool2d(7) on a 64x64 image's 2x2 features (windows
    of one and two elements), on a 32x32 image's 1x1 ones, 8 -> 3 (overlapping windows of three).
    The custom form sums each window in torch's order and divides as torch does: max diff 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(8 // pooled), nn.AdaptiveAvgPool2d(out),
                          nn.Flatten(), nn.LazyLinear(5))
    data = load_digits()
    model(data.x_train[:2])
    c = qcompiler.compile(model.eval(), qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8), calib_data=data)
    c.freeze()
    for fmt in ("custom", "qdq"):
        m = to_onnx(c.module, fmt)
        onnx.checker.check_model(m, full_check=True)
        parity = onnx_parity(c, m, data.x_test)
        assert parity.max_abs_diff <= (0.0 if fmt == "custom" else 1e-5) and parity.classes_agree == 1.0, parity
    assert c.lower().verify(c, data.x_test.numpy()).ok()

