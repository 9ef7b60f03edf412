"""qcompiler.hf: tiny transformers models (random weights, built from configs) compile with attention and MLP quantized."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.analysis import GRID, tensor_domains
from qcompiler.api import FloatLayerWarning
from numeric_checks import relative_error

transformers = pytest.importorskip("transformers", reason="optional extra: pip install 'qcompiler[transformers]'")
from qcompiler.hf import trace_transformers  # noqa: E402

SPEC8 = qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8)


def _ids(n: int = 32, length: int = 12) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 100, (n, length))


def _bert(attention: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                     attn_implementation=attention)
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2(attention: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     attn_implementation=attention)
    return transformers.GPT2LMHeadModel(config).eval()


# "sdpa" (transformers' default) is one fused call the front end spells out; "eager" writes the products itself
ATTENTION = ["sdpa", "eager"]


def _compile(model: nn.Module, ids: torch.Tensor):
    gm = trace_transformers(model, ["input_ids"], output="logits")
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids).logits)  # the traced graph is the model
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatLayerWarning)  # every layer with weights is quantized
        return qcompiler.compile(gm, SPEC8, calib_data=ids)


def _check(compiled, model: nn.Module, ids: torch.Tensor, projections: list[str], limit: float) -> None:
    """The records of a compiled tiny transformer, and its 8-bit logits within ``limit`` (relative L2) of float."""
    rows = {r.name: r for r in compiled.report.layers}
    for name in projections:
        assert (rows[name].kind, rows[name].weight_bits, rows[name].act_bits) == ("linear", 8, 8), name
    products = [r for r in rows.values() if r.kind == "matmul"]
    assert len(products) == 4 and all(r.act_bits == 8 for r in products)  # q @ k^T and attn @ v, two layers
    assert not [r.name for r in rows.values() if r.weight_bits is None and r.kind != "matmul"]
    assert {r.weight_bits for r in rows.values() if r.kind == "embedding"} == {8}
    domains = tensor_domains(compiled.module)
    # the attention mask is computed from shapes: a constant added to the scores, never put on a grid
    assert not [q.name for q in ir.act_quantizers(compiled.module) if domains[q.args[0]].kind == "const"]
    assert all(domains[a].kind == GRID for n in compiled.module.graph.nodes if ir.MATMUL in n.meta for a in n.args)
    with torch.no_grad():
        err = relative_error(compiled(ids), model(ids).logits)
    assert err < limit, err


@pytest.mark.parametrize("attention", ATTENTION)
def test_tiny_bert_compiles_with_attention_and_mlp_quantized(attention: str) -> None:
    model, ids = _bert(attention), _ids()
    compiled = _compile(model, ids)
    layer0 = [f"bert_encoder_layer_0_attention_self_{p}" for p in ("query", "key", "value")]
    layer0 += ["bert_encoder_layer_0_attention_output_dense", "bert_encoder_layer_0_intermediate_dense",
               "bert_encoder_layer_0_output_dense"]
    _check(compiled, model, ids, layer0 + [p.replace("layer_0", "layer_1") for p in layer0] + ["classifier"], 0.05)


@pytest.mark.parametrize("attention", ATTENTION)
def test_tiny_gpt2_conv1d_projections_become_quantized_linear_layers(attention: str) -> None:
    model, ids = _gpt2(attention), _ids()
    compiled = _compile(model, ids)
    names = [f"transformer_h_{i}_{p}" for i in (0, 1) for p in ("attn_c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj")]
    for name in names:  # Conv1D's (in, out) weight, transposed once into an nn.Linear
        module = compiled.module.get_submodule(name)
        conv1d = model.get_submodule(name.replace("transformer_h_", "transformer.h.").replace("_attn_", ".attn.")
                                     .replace("_mlp_", ".mlp."))
        assert torch.equal(module.weight.detach(), conv1d.weight.detach().t())
    # the tied output projection stays tied to the embedding it shares its weight with
    assert compiled.module.get_submodule("lm_head").weight is compiled.module.get_submodule("transformer.wte").weight
    _check(compiled, model, ids, names + ["lm_head"], 0.05)


def test_a_compiled_transformers_model_saves_and_loads(tmp_path) -> None:
    model, ids = _gpt2(), _ids(8)
    compiled = _compile(model, ids)
    compiled.save(tmp_path / "gpt2")
    loaded = qcompiler.Compiled.load(tmp_path / "gpt2", trust=True)  # unpickling traces the code again
    with torch.no_grad():
        assert torch.equal(loaded(ids), compiled(ids))
    assert [(r.name, r.weight_bits, r.act_bits) for r in loaded.report.layers] == \
        [(r.name, r.weight_bits, r.act_bits) for r in compiled.report.layers]


def test_a_model_without_the_named_output_says_which_it_has() -> None:
    with pytest.raises(qcompiler.errors.TraceError, match="has no output 'logits'"):
        trace_transformers(transformers.BertModel(_bert().config), ["input_ids"], output="logits")


def test_masks_are_restored_after_tracing() -> None:
    from transformers import masking_utils

    before = dict(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace_transformers(_gpt2(), ["input_ids"])
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping == before
    assert "iter" not in vars(transformers.utils.fx.HFTracer)


@pytest.mark.parametrize("fmt", ["custom", "qdq"])
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_tiny_transformers_export_to_onnx_with_masks_built_from_shapes(make, attention: str, fmt: str) -> None:
    """BERT's mask of ones, GPT-2's position ids and causal mask are constants of the file, expanded to the
    run-time batch: the custom form computes the module's logits, the QDQ form (fused by onnxruntime) its
    classes, at the calibration batch size and another."""
    from qcompiler.runtime.onnx_export import onnx_parity, to_onnx

    compiled = _compile(make(attention), _ids())
    compiled.freeze()
    onnx_model = to_onnx(compiled.module, fmt)
    test = torch.randint(0, 100, (40, 12), generator=torch.Generator().manual_seed(5))
    for x in (test, test[:3]):
        parity = onnx_parity(compiled, onnx_model, x)
        assert parity.classes_agree == 1.0, parity.text()
        if fmt == "custom":
            assert parity.max_abs_diff <= 1e-4 * parity.output_range, parity.text()
