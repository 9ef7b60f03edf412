"""The ``refine-steps`` pass: activation steps chosen for the layers reading them, kept where the output improves."""

import pytest
import torch

import qcompiler
from qcompiler import ir
from qcompiler.data import load_digits
from qcompiler.passes import PassContext
from qcompiler.passes.refine_steps import RefineSteps
from qcompiler.zoo import plain_cnn, resnet20


CALIB = [load_digits().x_train[i * 64:(i + 1) * 64] for i in range(8)]


def _compile(model, passes, bits=8, **spec):
    torch.manual_seed(0)
    return qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits, **spec),
                             calib_data=CALIB)


@pytest.mark.parametrize("bits", [4, 8])
def test_refined_steps_bring_the_output_closer_to_float(bits):
    torch.manual_seed(0)
    model = resnet20(in_channels=1, width=4).eval()
    plain = _compile(model, "lsq", bits, bias_correction=False)
    refined = _compile(model, "lsq,refine-steps", bits, bias_correction=False)
    records = {n.name: n.meta[ir.REFINE] for n in refined.module.graph.nodes if ir.REFINE in n.meta}
    assert records and all(ir.ACT in refined.module.graph.find_nodes(op="call_module", target=n)[0].meta
                           for n in records)
    changed = {n: r for n, r in records.items() if r.factor != 1.0}
    assert changed, records  # something moved ...
    for r in changed.values():  # ... each kept change lowered both errors it was judged by
        assert r.layer_error < 1.0 and r.output_error < 1.0
    x = torch.cat(CALIB)  # what it promises: closer to float on the data it was measured on
    with torch.no_grad():
        y = model(x)
        errors = [float((c.module.eval()(x) - y).norm() / y.norm()) for c in (plain, refined)]
    assert errors[1] < errors[0], errors
    for name, r in records.items():  # the steps moved by exactly the recorded factor
        before = plain.module.get_submodule(name).step.detach()
        after = refined.module.get_submodule(name).step.detach()
        torch.testing.assert_close(after, before * r.factor, rtol=1e-6, atol=0)


def test_a_second_run_changes_nothing_and_backends_still_agree():
    c = _compile(plain_cnn(width=4), "lsq,refine-steps")
    x = load_digits().x_test
    ctx = PassContext(spec=c.spec, example_inputs=(x[:1],), calib_batches=[x[:64]])
    assert not RefineSteps().run(c.module, ctx).modified
    report = c.lower().verify(c, x.numpy())
    assert report.ok(identical=0.999, max_diff=1, classes=0.995), report.text()
    from qcompiler.runtime.onnx_export import onnx_parity, to_onnx

    c.freeze()
    parity = onnx_parity(c, to_onnx(c.module), x)
    assert parity.classes_agree == 1.0 and parity.max_abs_diff <= 1e-4 * max(parity.output_range, 1e-6), parity.text()


def test_without_quantized_layers_it_finds_nothing():
    c = _compile(plain_cnn(width=4), "lsq")
    ctx = PassContext(spec=c.spec, example_inputs=(load_digits().x_test[:1],), calib_batches=[load_digits().x_test[:64]])
    for n in c.module.graph.nodes:  # as if every quantizer had been refined already
        if ir.ACT in n.meta:
            n.meta[ir.REFINE] = ir.StepRefinement(1.0, 1.0, 1.0)
    assert not RefineSteps().run(c.module, ctx).modified
