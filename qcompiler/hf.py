"""Hugging Face ``transformers`` models as compiler input (optional extra ``qcompiler[transformers]``).

Their ``forward`` branches on optional arguments and input shapes, which plain
``torch.fx`` cannot trace; ``transformers.utils.fx.symbolic_trace`` can, given the
names of the inputs the model is called with. The front end takes the resulting
``GraphModule`` as already traced (:func:`qcompiler.frontend.trace`), so
:func:`trace_transformers` only picks the one output tensor the compiler follows
(``logits``, ``last_hidden_state``) out of the model's output dictionary.

What is quantized then: every ``nn.Linear`` (BERT's attention and MLP projections),
GPT-2's ``Conv1D`` projections (traced as ``torch.addmm(bias, x, W)`` with ``W``
stored ``(in, out)``; the front end makes each an ``nn.Linear`` holding the
transposed weight, :mod:`qcompiler.functional_layers`) and the attention products
``q @ k^T`` and ``attn @ v`` (pass ``quantize-matmuls``). Embeddings, layer norms,
GELU and softmax stay float, each listed with its reason in the report.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification  # doctest: +SKIP
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))  # doctest: +SKIP
    >>> gm = trace_transformers(model, ["input_ids"], output="logits")  # doctest: +SKIP
    >>> compiled = qcompiler.compile(gm, spec, calib_data=input_ids)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import QCompileError, TraceError


def trace_transformers(model: nn.Module, input_names: Sequence[str] = ("input_ids",), output: str = "logits") -> fx.GraphModule:
    """``model`` traced by transformers' tracer, returning only its ``output`` tensor."""
    try:
        from transformers.utils.fx import symbolic_trace
    except ImportError:
        raise QCompileError("tracing a transformers model needs the optional extra: pip install 'qcompiler[transformers]'") from None
    try:
        with _broadcast_masks(), _iterable_shapes():
            gm = symbolic_trace(model, input_names=list(input_names))
    except Exception as e:  # transformers raises many kinds for unsupported architectures
        raise TraceError(f"transformers cannot trace {type(model).__name__} with inputs {list(input_names)}: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    result = out.args[0]
    if not isinstance(result, dict) or output not in result:
        names = sorted(result) if isinstance(result, dict) else type(result).__name__
        raise TraceError(f"{type(model).__name__} has no output {output!r} (it returns {names}); pick one of those")
    out.args = (result[output],)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    # Unpickling a GraphModule traces its code again with the tracer that made it; transformers'
    # tracer then needs example inputs, which it would otherwise make from attributes that copies
    # of the module (the compiled one) do not keep. Token ids of a short sequence serve any model.
    gm._tracer_extras = {"dummy_inputs": {name: torch.zeros(1, 8, dtype=torch.long) for name in input_names}}
    return gm


@contextlib.contextmanager
def _iterable_shapes() -> Iterator[None]:
    """While tracing, let ``(*x.shape[:-1], -1)`` unpack a traced shape, as GPT-2's attention does.

    transformers' proxies know their concrete value (``_metadata``) but, unlike ``len``,
    do not iterate; a traced tuple of known length unpacks into one ``getitem`` per item.
    """
    from transformers.utils.fx import HFTracer

    def iterate(self, obj):
        meta = getattr(obj, "_metadata", None)
        if meta is None:
            return fx.Tracer.iter(self, obj)
        return iter([obj[i] for i in range(len(meta))])

    saved = HFTracer.__dict__.get("iter")
    HFTracer.iter = iterate
    try:
        yield
    finally:
        if saved is None:
            del HFTracer.iter
        else:
            HFTracer.iter = saved


@contextlib.contextmanager
def _broadcast_masks() -> Iterator[None]:
    """While tracing, build attention masks by broadcasting instead of ``torch.vmap``.

    transformers 4.57 makes every causal mask (GPT-2's included) by vmapping the mask
    function over the index ranges, which its own fx tracer cannot trace ("We cannot
    vmap over non-Tensor arguments"). Its mask functions are elementwise comparisons
    and indexing, so calling one on broadcast index tensors gives the same boolean mask.
    """
    try:
        from transformers import masking_utils as mu
    except ImportError:  # an older transformers builds masks without vmap
        yield
        return

    def sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=mu.causal_mask_function,
                  attention_mask=None, **_):
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        if padding is not None:
            mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding))
        device = cache_position.device
        b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q = cache_position.view(1, 1, -1, 1)
        kv = (torch.arange(kv_length, device=device) + kv_offset).view(1, 1, 1, -1)
        return mask_function(b, h, q, kv).expand(batch_size, 1, -1, -1)

    def eager_mask(*args, dtype=torch.float32, **kwargs):
        # 0 where attended, the dtype's minimum elsewhere; arithmetic rather than torch.where,
        # whose shape rule in transformers' tracer fails on a number operand
        allowed = sdpa_mask(*args, **kwargs)
        return (~allowed).to(dtype) * torch.finfo(dtype).min

    mapping = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    saved = dict(mapping)
    mapping.update(sdpa=sdpa_mask, eager=eager_mask)
    try:
        yield
    finally:
        mapping.update(saved)


__all__ = ["trace_transformers"]
