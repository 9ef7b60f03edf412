"""qcompiler.compile on every zoo model with every scheme that applies to it."""

import pytest
import torch

import qcompiler
from qcompiler import ir, zoo
from qcompiler.passes import SCHEMES

SMALL = {
    "resnet20": {"width": 8}, "resnet18": {"width": 8}, "resnet50": {"width": 8},
    "mobilenetv2": {"width_mult": 0.5}, "plain_cnn": {"width": 8}, "conv1d_net": {"width": 8},
    "adder_resnet20": {"width": 4},
}


def _calib(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(16, 1, 64) if name == "conv1d_net" else torch.randn(16, 1, 8, 8)


def test_every_zoo_model_is_covered():
    assert set(SMALL) == set(zoo.ZOO)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("scheme", ["LSQ", "ASQ+POST", "adder-redistribution"])
def test_every_zoo_model_compiles(name, scheme):
    if scheme.startswith("adder") and not name.startswith("adder"):
        pytest.skip("adder passes only touch adder layers")
    model = zoo.build(name, in_channels=1, num_classes=10, **SMALL[name]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _calib(name)
    spec = qcompiler.QuantSpec(passes=SCHEMES[scheme], weight_bits=4, act_bits=4)
    compiled = qcompiler.compile(model, spec, calib_data=calib, verify=True)

    with torch.no_grad():
        out = compiled(calib[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    for layer in ir.compute_layers(compiled.module):
        kind = ir.get(layer, ir.LAYER, ir.LayerInfo).kind
        if kind != "adder2d" and not scheme.startswith("adder"):
            assert ir.WEIGHT in layer.meta and ir.ACT in layer.args[0].meta, layer.name
        if kind == "adder2d" and scheme.startswith("adder"):
            assert ir.ADDER_Q in layer.meta, layer.name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
