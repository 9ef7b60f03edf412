"""Front end: a float ``nn.Module`` plus example inputs become the IR.

The IR is a ``torch.fx.GraphModule`` traced from a deep copy of the user's model
(never the model itself), with shapes propagated from the example inputs and a
``LayerInfo`` record on every compute layer. Tracing failures are turned into one
line that names the module that could not be traced and how to mark it a leaf.

Example:
    >>> from torch import nn
    >>> gm = trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    >>> [n.name for n in compute_layers(gm)]
    ['_0']
"""

from __future__ import annotations

import contextlib
import copy
import io
import importlib
import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import ir
from .errors import DataError, SpecError, TraceError, UnsupportedError
from .attention import spell_out_attention
from .functional_layers import functional_to_modules
from .ir import LayerInfo, compute_layers
from .training_calls import restore_training_flags
from .nn.adder import AdderConv2d
from .nn.attention import TracedMultiheadAttention, call_reason, mark_unsupported, unsupported_reason

# These classes and their subclasses that keep the class's forward (layer_kind).
LAYER_KINDS: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d",
    nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d",
    nn.Linear: "linear",
    nn.Embedding: "embedding",
    AdderConv2d: "adder2d",
}
TRANSPOSED_KINDS = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def layer_base(m: nn.Module) -> type[nn.Module] | None:
    """The nearest class of ``LAYER_KINDS`` that ``m`` is an instance of, if any."""
    return next((cls for cls in type(m).__mro__ if cls in LAYER_KINDS), None)


def layer_kind(m: nn.Module) -> str | None:
    """The layer kind of ``m``: one of ``LAYER_KINDS``' classes, or a subclass of one whose
    forward is the class's own (``class MyConv(nn.Conv2d)`` adding only methods or defaults).

    A subclass that overrides ``forward`` may compute anything (padding first, another
    weight), so it is no layer of that kind: it stays float, and the layer table says why
    (:func:`qcompiler.analysis.float_module_reason`).

    >>> class Same(nn.Conv2d):
    ...     def forward(self, x):
    ...         return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))
    >>> layer_kind(nn.Conv2d(1, 1, 3)), layer_kind(Same(1, 1, 3)), layer_kind(nn.ReLU())
    ('conv2d', None, None)
    """
    base = layer_base(m)
    return LAYER_KINDS[base] if base is not None and type(m).forward is base.forward else None


class _Tracer(fx.Tracer):
    """fx tracer that keeps our own layers opaque and remembers where it failed."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:  # default: unpickling rebuilds it bare
        super().__init__()
        self.leaf_types = (AdderConv2d, *leaf_types)
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A user subclass of a layer class stays whole too: quantized like its base, or reported float.
        return isinstance(m, self.leaf_types) or layer_base(m) is not None or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module wins
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def resolve_leaf_types(names: Sequence[str]) -> tuple[type, ...]:
    """Import ``"package.module:Class"`` names given as leaf modules."""
    types = []
    for name in names:
        mod_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError, ValueError):
            raise SpecError(f"leaf module {name!r} cannot be imported; write it as package.module:Class") from None
        types.append(cls)
    return tuple(types)


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    leaf_modules: Sequence[str] = (),
) -> fx.GraphModule:
    """Trace a copy of ``model`` into the IR and annotate its compute layers.

    A ``torch.fx.GraphModule`` is taken as already traced: a copy of its graph is the
    IR as it stands, so ``leaf_modules`` cannot apply and asking for them is an error.
    That is the hook for models our tracer cannot trace but another can, e.g.
    transformers' own tracer (:func:`qcompiler.hf.trace_transformers`).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule) and leaf_modules:
        raise SpecError(f"leaf_modules {list(leaf_modules)} cannot apply to a model that is already a torch.fx.GraphModule; "
                        "pass the nn.Module itself, or trace it with those modules as leaves and drop leaf_modules")
    original, model = model, copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        # unpickling traces the code again with the tracer's extras (transformers': example inputs),
        # which a deep copy drops
        model._tracer_extras = dict(getattr(original, "_tracer_extras", {}))
        return _annotated(model, example_inputs)
    if layer_base(model) is not None:  # a bare layer would trace to a plain function call
        model = nn.Sequential(model)
    leaf_types = resolve_leaf_types(leaf_modules)
    gm = _trace_graph(model, leaf_types)
    if any(type(m) is nn.MultiheadAttention for m in model.modules()):
        propagate_shapes(gm, example_inputs)  # expand_attention reads the shapes of each call
        if expand_attention(model, gm):  # traced again through the attention modules' projections
            gm = _trace_graph(model, leaf_types)
            drop_unused_attention_weights(gm)
    return _annotated(gm, example_inputs)


def _trace_graph(model: nn.Module, leaf_types: tuple[type, ...]) -> fx.GraphModule:
    """``model`` traced into a GraphModule, or one line naming what could not be traced."""
    tracer = _Tracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds; all mean "not traceable"
        where = tracer.failed_in
        what = f"module {where[0]!r} ({where[1]})" if where and where[0] else f"model {type(model).__name__}"
        hint = f"{type(model.get_submodule(where[0])).__module__}:{where[1]}" if where and where[0] else "package.module:Class"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"cannot trace {what}: {reason}; make its forward traceable or mark it a leaf "
            f"with --leaf {hint} (QuantSpec(leaf_modules=[...]))"
        ) from None
    for node in graph.nodes:
        # String annotations (from __future__ import annotations) break pickling of the module.
        if isinstance(node.type, str):
            node.type = None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _annotated(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """The traced copy ``gm`` as IR: functional layers and dropouts made modules, shapes and layer records written."""
    restore_training_flags(gm)  # F.dropout(x, p, self.training) traced in eval: a module that follows .train()
    functional_to_modules(gm)  # F.conv2d(x, self.weight) becomes a Conv2d sharing that Parameter
    drop_single_concats(gm)
    explicit_padding(gm)
    propagate_shapes(gm, example_inputs)
    if spell_out_attention(gm):  # fused attention as its two products, which quantize-matmuls quantizes
        propagate_shapes(gm, example_inputs)
    annotate_layers(gm)
    return gm


def explicit_padding(gm: fx.GraphModule) -> None:
    """A conv with ``padding_mode`` reflect, replicate or circular as what torch computes for it:
    ``F.pad`` of its input in that mode, then the conv without padding.

    The padding copies codes (:func:`qcompiler.analysis.padding_positions`), so every backend then
    expresses it, where the conv's own non-zero padding had no form. Every call site of a shared
    conv gets its pad; the conv (the traced copy's) is then set to zero padding of zero width.
    """
    sites: dict[nn.Module, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.padding_mode != "zeros":
                sites.setdefault(m, []).append(node)
    for m, nodes in sites.items():
        for node in nodes:
            with gm.graph.inserting_before(node):
                padded = gm.graph.call_function(F.pad, (node.args[0], list(m._reversed_padding_repeated_twice)),
                                                {"mode": m.padding_mode})
            node.replace_input_with(node.args[0], padded)
        m.padding, m.padding_mode = (0,) * len(m.kernel_size), "zeros"
        m._reversed_padding_repeated_twice = [0] * (2 * len(m.kernel_size))
    if sites:
        gm.recompile()


def drop_single_concats(gm: fx.GraphModule) -> None:
    """Replace ``torch.cat([x])`` (a dense block's first concat) by ``x``: it is ``x``, and as
    a concat of one operand it would be neither a join nor an op with an integer form.

    >>> class Block(nn.Module):
    ...     def forward(self, x):
    ...         return torch.relu(torch.cat([x], 1))
    >>> gm = fx.symbolic_trace(Block()); drop_single_concats(gm)
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_function', 'output']
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
            continue
        seq = node.args[0] if node.args else node.kwargs.get("tensors")
        if isinstance(seq, (list, tuple)) and len(seq) == 1 and isinstance(seq[0], fx.Node):
            node.replace_all_uses_with(seq[0])
            gm.graph.erase_node(node)
    gm.recompile()


def drop_unused_attention_weights(gm: fx.GraphModule) -> None:
    """Erase the ops of a traced attention module that nothing reads (its head-averaged weights,
    computed because ``need_weights`` defaults to True), so no float node is reported for them."""
    for node in reversed(list(gm.graph.nodes)):
        stack = node.meta.get("nn_module_stack", {})
        inside = any(cls is TracedMultiheadAttention or getattr(cls, "__name__", "") == "TracedMultiheadAttention"
                     for _, cls in stack.values())
        if inside and not node.users and node.op in ("call_function", "call_method"):
            gm.graph.erase_node(node)
    gm.recompile()


def expand_attention(root: nn.Module, gm: fx.GraphModule) -> bool:
    """Replace in ``root`` each ``nn.MultiheadAttention`` by its traceable form
    (:class:`~qcompiler.nn.attention.TracedMultiheadAttention`), whose ``nn.Linear`` projections the
    passes quantize; returns whether any was replaced.

    Only where every call of the module in ``gm`` (traced with it as a leaf, shapes known) is
    one that form computes; any other module is left whole, in float, with the reason recorded
    on it for the layer table (:func:`qcompiler.nn.attention.unsupported_reason`).
    """
    reasons: dict[str, str | None] = {}
    for node in gm.graph.nodes:
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if type(m) is not nn.MultiheadAttention:  # exact: a subclass may compute something else
            continue
        args = inspect.signature(nn.MultiheadAttention.forward).bind(m, *node.args, **node.kwargs)
        args.apply_defaults()
        a = args.arguments
        meta = a["query"].meta.get("tensor_meta") if isinstance(a["query"], fx.Node) else None
        rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        reason = unsupported_reason(m) or call_reason(rank, a["need_weights"], a["average_attn_weights"], a["is_causal"],
                                                      a["attn_mask"] is not None)
        reasons[node.target] = reasons.get(node.target) or reason
    for target, reason in reasons.items():
        if reason is not None:
            mark_unsupported(root.get_submodule(target), reason)
            continue
        parent, _, leaf = target.rpartition(".")
        setattr(root.get_submodule(parent), leaf, TracedMultiheadAttention.from_module(root.get_submodule(target)))
    return any(r is None for r in reasons.values())



def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` once on the example inputs, recording every tensor's shape."""
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(example_inputs) != n_inputs:
        raise DataError(f"the model takes {n_inputs} input(s) but {len(example_inputs)} example input(s) were given")
    try:
        # ShapeProp prints the failing node's traceback itself; the user gets one line.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        cause = e.__cause__ or e
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        param = next((t for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()), None)
        dtypes = {str(x.dtype).removeprefix("torch.") for x in example_inputs}
        if param is not None and ("scalar type" in reason or "dtype" in reason) and dtypes != {str(param.dtype).removeprefix("torch.")}:
            want = str(param.dtype).removeprefix("torch.")
            raise DataError(
                f"input of dtype {', '.join(sorted(dtypes))} does not match the model's {want} weights ({reason}); "
                f"convert the data or the model to one dtype (e.g. x.to(torch.{want}))"
            ) from None
        raise DataError(
            f"input of shape {shapes} does not fit the model ({reason}); give data shaped as the model expects"
        ) from None


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else ()


def annotate_layers(gm: fx.GraphModule) -> None:
    """Write a ``LayerInfo`` record on each conv / linear / adder node."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        kind = layer_kind(m)
        if kind is None or (kind == "embedding" and m.max_norm is not None):  # max_norm rewrites rows as it reads them
            continue
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        w = m.weight
        if kind in TRANSPOSED_KINDS:
            # Each input element is scattered to out_channels/groups * prod(kernel) outputs.
            macs = math.prod(w.shape[1:]) * (math.prod(in_shape) if in_shape else w.shape[0])
        else:
            # Each output element costs in_channels/groups * prod(kernel) accumulates.
            macs = math.prod(w.shape[1:]) * (math.prod(out_shape) if out_shape else w.shape[0])
        if kind == "embedding":  # a lookup: no multiply-accumulates; each row is an output "channel" of the weight grid
            macs = 0
        conv_like = kind not in ("linear", "embedding")
        if conv_like and getattr(m, "padding_mode", "zeros") != "zeros":
            raise UnsupportedError(
                f"layer {node.target!r} uses padding_mode={m.padding_mode!r}; only zero padding is supported: "
                "pad explicitly with F.pad before the layer and set padding_mode='zeros'"
            )
        node.meta[ir.LAYER] = LayerInfo(
            kind=kind,
            in_channels=m.in_channels if conv_like else m.num_embeddings if kind == "embedding" else m.in_features,
            out_channels=m.out_channels if conv_like else m.embedding_dim if kind == "embedding" else m.out_features,
            weight_shape=tuple(w.shape),
            input_shape=in_shape,
            output_shape=out_shape,
            macs=macs,
            kernel_size=tuple(m.kernel_size) if conv_like else (),
            stride=tuple(m.stride) if conv_like else (),
            padding=resolved_padding(m) if conv_like else (),
            groups=m.groups if conv_like else 1,
            has_bias=getattr(m, "bias", None) is not None,
            dilation=tuple(m.dilation) if conv_like else (),
            padding_mode="zeros",
            output_padding=transposed_output_padding(m, in_shape, out_shape) if kind in TRANSPOSED_KINDS else (),
        )


def transposed_output_padding(m: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A transposed conv's extra output size per spatial dim, as traced: its ``output_padding``,
    or what a call with ``output_size=`` chose (the output's size less the size without it)."""
    dims = len(m.kernel_size)
    if len(in_shape) != dims + 1 or len(out_shape) != dims + 1:
        return tuple(m.output_padding)
    return tuple(
        o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
        for i, o, s, p, d, k in zip(in_shape[1:], out_shape[1:], m.stride, m.padding, m.dilation, m.kernel_size)
    )


def resolved_padding(m: nn.Module) -> tuple[int, ...]:
    """``(before, after)`` zero padding per spatial dimension, ``'same'`` and ``'valid'`` resolved.

    As in ``torch.nn.Conv2d``, ``'same'`` puts the odd pixel of an even total after.

    >>> resolved_padding(nn.Conv2d(1, 1, kernel_size=4, padding="same"))
    (1, 2, 1, 2)
    >>> resolved_padding(nn.Conv1d(1, 1, kernel_size=3, padding=2))
    (2, 2)
    """
    kernel, dilation = tuple(m.kernel_size), tuple(m.dilation)
    if m.padding == "valid":
        return (0,) * (2 * len(kernel))
    if m.padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple(v for t in totals for v in (t // 2, t - t // 2))
    pads = (m.padding,) * len(kernel) if isinstance(m.padding, int) else tuple(m.padding)
    return tuple(v for p in pads for v in (p, p))


__all__ = ["trace", "propagate_shapes", "annotate_layers", "compute_layers", "layer_base", "layer_kind", "LAYER_KINDS",
           "TRANSPOSED_KINDS"]
