"""qcompiler.compile on every zoo model with every scheme that applies to it."""

import pytest
import torch

import qcompiler
from qcompiler import ir, zoo
from qcompiler.passes import SCHEMES
from qcompiler.verify import unrecorded_float, verify_graph

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


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_zoo_model_compiles_to_a_verified_integer_graph(name, scheme, bits):
    """Every zoo model x scheme: the IR rules hold after every pass and at the end,
    and no edge computes in float unless a record says why."""
    if scheme.startswith("adder") and not name.startswith("adder"):
        pytest.skip("adder passes only touch adder layers")
    model = zoo.build(name, in_channels=1, num_classes=10, **SMALL[name]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _calib(name)
    spec = qcompiler.QuantSpec(passes=SCHEMES[scheme], weight_bits=bits, act_bits=bits)
    compiled = qcompiler.compile(model, spec, calib_data=calib, verify=True)
    gm = compiled.module

    verify_graph(gm, final=True)
    assert unrecorded_float(gm) == []
    floats = {n.name: n.meta[ir.FLOAT].reason for n in gm.graph.nodes if ir.FLOAT in n.meta}
    adder_model_without_adder_passes = name.startswith("adder") and not scheme.startswith("adder")
    if not adder_model_without_adder_passes:
        assert floats == {}, floats  # the whole network runs in integers
    else:  # the adder layers themselves stay float, and the report says so
        assert any("adder2d layer that no pass in the pipeline quantizes" in r for r in floats.values())
    with torch.no_grad():
        out = compiled(calib[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    for layer in ir.compute_layers(gm):
        kind = ir.get(layer, ir.LAYER, ir.LayerInfo).kind
        if kind != "adder2d":
            assert ir.WEIGHT in layer.meta and ir.ACT in layer.args[0].meta, layer.name
            assert ir.CODES in layer.meta, layer.name
        if kind == "adder2d" and scheme.startswith("adder"):
            assert ir.ADDER_Q in layer.meta and ir.CODES in layer.meta, layer.name
    for join in (n for n in gm.graph.nodes if ir.JOIN in n.meta):
        assert all(ir.ACT in gm.graph.find_nodes(op="call_module", target=q)[0].meta for q in join.meta[ir.JOIN].inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_and_load_round_trip_keeps_records(tmp_path):
    model = zoo.build("resnet20", in_channels=1, num_classes=10, width=4).eval()
    calib = _calib("resnet20")
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes="asq,post"), calib_data=calib)
    compiled.save(tmp_path / "out")
    loaded = qcompiler.Compiled.load(tmp_path / "out", trust=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib), compiled(calib))
    layer = next(n for n in loaded.module.graph.nodes if n.name == "stages_0_conv1")
    codes = ir.get(layer, ir.CODES, ir.WeightCodes)
    assert codes.grid == "post" and codes.codes.shape == layer.meta[ir.LAYER].weight_shape
    assert loaded.spec == compiled.spec
    assert [r.weight_quantizer for r in loaded.report.layers] == [r.weight_quantizer for r in compiled.report.layers]


def test_save_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    compiled = qcompiler.compile(zoo.build("plain_cnn", width=4), calib_data=_calib("plain_cnn"))
    with pytest.raises(qcompiler.QCompileError, match="holds other files"):
        compiled.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
