"""Graph edits shared by the quantizer passes.

Every quantizer pass does the same few rewrites: put an activation quantizer on a
tensor, give a layer a weight quantizer, and, for the multiply layers (conv /
linear), both at once. Keeping them here means the naming of inserted modules and
the records they carry are uniform, which the dumps, reports and backends rely on.

One tensor, one quantizer per width: a tensor read by several quantized layers
(a downsample block's first conv and its 1x1 shortcut) gets one quantizer node
that all of them read, so they see the same codes, step and ASQ adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn

from .. import ir
from ..nn import saved
from ..nn.layout import channel_weight
from ..nn.qat import with_weight_quant
from ..quantizers import UniformQuantizer, init
from .base import PassContext

MULTIPLY_LAYERS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear")
# Layers that read integer indices, not an activation: only their weight (a table of rows) is quantized.
LOOKUP_LAYERS = ("embedding",)

# (layer node, its LayerInfo, activation bits, signed codes, context) -> (quantizer, method name)
# (layer, its info, bits, (signed, zero_point) from init.choose_grid, ctx) -> (quantizer, method)
ActQuantizerFactory = Callable[[fx.Node, ir.LayerInfo, int, tuple[bool, 'int | None'], PassContext], tuple[nn.Module, str]]


def input_quantizer(layer: fx.Node) -> fx.Node | None:
    """The activation-quantizer node in front of ``layer``, if any."""
    return layer.args[0] if ir.input_act(layer) is not None else None


def insert_quantizer(gm: fx.GraphModule, src: fx.Node, name: str, quantizer: nn.Module, record: ir.ActQuant) -> fx.Node:
    """A new quantizer node ``name`` reading ``src``, placed right after it (no users yet)."""
    gm.add_submodule(name, quantizer)
    if src.op == "call_module":  # in training, a batch norm's output is made again in backward, not kept
        saved.recompute_output(gm.get_submodule(src.target))
    with gm.graph.inserting_after(src):
        qnode = gm.graph.call_module(name, (src,))
    qnode.name = name
    if "tensor_meta" in src.meta:
        qnode.meta["tensor_meta"] = src.meta["tensor_meta"]
    qnode.meta[ir.ACT] = record
    return qnode


def init_act_step(quantizer: UniformQuantizer, rng: ir.TensorRange, how: str) -> None:
    """Start an activation step from the calibration statistics as ``how`` says
    (:data:`qcompiler.quantizers.init.INITS`): ``"lsq"`` is LSQ's ``2 mean|x| / sqrt(p)``
    (a QAT start), the others a clip the grid reaches (``"max"``: no clipping)."""
    clip = init.act_clip(rng, quantizer.bits, quantizer.signed, how, quantizer.zero_point)
    if clip is None:
        quantizer.init_from(mean_abs=rng.mean_abs)
    else:
        quantizer.init_from_max(clip)


def quantize_input(
    gm: fx.GraphModule, layer: fx.Node, quantizer: UniformQuantizer, method: str, rng: ir.TensorRange, how: str,
    operand: int = 0, name: str | None = None,
) -> fx.Node:
    """Make ``layer`` read its input ``operand`` through an activation quantizer.

    Reuses a quantizer of the same width, code range and method that another layer
    already reads on the same tensor; otherwise inserts ``quantizer`` (named ``name``,
    by default after ``layer``) with its step started as ``how`` says. Returns the
    quantizer node.
    """
    src = layer.args[operand]
    bits, signed, zero_point = quantizer.bits, quantizer.signed, quantizer.zero_point
    for user in src.users:
        rec = user.meta.get(ir.ACT)
        if rec is not None and (rec.method, rec.bits, rec.signed, rec.zero_point) == (method, bits, signed, zero_point) \
                and rec.role == "input":
            layer.replace_input_with(src, user)
            return user
    name = name or f"{layer.name}_act"
    init_act_step(quantizer, rng, how)
    # the network input's range is the data's: a calibrated uniform step on it is held (ir.ActQuant)
    learned = not (src.op == "placeholder" and type(quantizer) is UniformQuantizer and how != "lsq")
    quantizer.step.requires_grad_(learned)
    record = ir.ActQuant(role="input", method=method, bits=bits, signed=signed, module=name, init=how, learned=learned,
                         zero_point=zero_point)
    qnode = insert_quantizer(gm, src, name, quantizer, record)
    layer.replace_input_with(src, qnode)
    return qnode


def set_weight_quantizer(gm: fx.GraphModule, layer: fx.Node, quantizer: nn.Module, record: ir.WeightQuant) -> None:
    """Make ``layer`` compute with ``quantizer(weight)``."""
    module = gm.get_submodule(layer.target)
    gm.add_submodule(layer.target, with_weight_quant(module, quantizer))
    layer.meta[ir.WEIGHT] = record


def quantize_weight_uniform(gm: fx.GraphModule, layer: fx.Node, bits: int, how: str) -> None:
    """Per-output-channel learned-step quantizer on ``layer``'s weight (per row for an embedding),
    its steps started as ``how`` says."""
    weight = channel_weight(gm.get_submodule(layer.target)).detach()
    wq = UniformQuantizer(bits, signed=True, channels=weight.shape[0])
    wq.init_weight(weight, how)
    per = "per-row" if ir.get(layer, ir.LAYER, ir.LayerInfo).kind in LOOKUP_LAYERS else "per-channel"
    record = ir.WeightQuant(grid="uniform", bits=bits, granularity=per, module=f"{layer.target}.weight_quant", init=how)
    set_weight_quantizer(gm, layer, wq, record)


def layer_bits(layer: fx.Node, spec) -> tuple[int, int]:
    """(weight bits, activation bits) of ``layer`` after pinning and overrides.

    A module called at several sites has one weight tensor and so one weight grid:
    its weight width is the widest any of its call sites asks for (a pinned site wins),
    and every site reports that grid. Input widths stay per site.
    """
    def bits(node: fx.Node) -> tuple[int, int]:
        pin = ir.find(node, ir.PIN, ir.Pin)
        return spec.layer_bits(node.name, pin.bits if pin else None, str(node.target))

    w_bits, a_bits = bits(layer)
    for site in call_sites(layer):
        w_bits = max(w_bits, bits(site)[0])
    return w_bits, a_bits


def call_sites(layer: fx.Node) -> list[fx.Node]:
    """Every call of the module ``layer`` calls, ``layer`` included, in graph order."""
    if layer.op != "call_module":
        return [layer]
    return [n for n in layer.graph.nodes if n.op == "call_module" and n.target == layer.target]


def quantize_multiply_layers(
    gm: fx.GraphModule,
    ctx: PassContext,
    make_act_quantizer: ActQuantizerFactory,
    how: str | None = None,
    bits: int | None = None,
) -> bool:
    """Input quantizer from ``make_act_quantizer`` plus uniform weights on every
    not-yet-quantized conv / linear layer, and uniform per-row weights on every embedding
    (its output, the rows it looks up, is then on the weight grid); returns whether anything changed.

    ``bits`` replaces the spec's widths for layers that are not pinned (the adder
    pipelines' multiply layers); ``how`` picks how steps start (see :func:`init_act_step`),
    the spec's ``init`` when not given. Each input gets the signed or unsigned grid with
    the lower expected error, or with ``asymmetric_acts`` the best zero point
    (:func:`qcompiler.quantizers.init.choose_grid`).
    """
    how = how or ctx.spec.init
    changed = False
    for layer in ir.compute_layers(gm):
        info = ir.get(layer, ir.LAYER, ir.LayerInfo)
        if info.kind not in MULTIPLY_LAYERS + LOOKUP_LAYERS or ir.WEIGHT in layer.meta or ir.FLOAT in layer.meta:
            continue
        w_bits, a_bits = layer_bits(layer, ctx.spec)
        if bits is not None and ir.PIN not in layer.meta:
            w_bits = a_bits = bits
        if info.kind in LOOKUP_LAYERS:
            quantize_weight_uniform(gm, layer, w_bits, how)
            changed = True
            continue
        rng = ir.get(layer.args[0], ir.RANGE, ir.TensorRange)
        aq, method = make_act_quantizer(layer, info, a_bits, init.choose_grid(rng, a_bits, ctx.spec.asymmetric_acts), ctx)
        quantize_input(gm, layer, aq, method, rng, how)
        quantize_weight_uniform(gm, layer, w_bits, how)
        changed = True
    return changed


def lsq_act_quantizer(layer: fx.Node, info: ir.LayerInfo, bits: int, grid: tuple[bool, int | None],
                      ctx: PassContext) -> tuple[nn.Module, str]:
    """A per-tensor LSQ quantizer on ``grid``, ``(signed, zero_point)``."""
    signed, zero_point = grid
    return UniformQuantizer(bits, signed=signed, zero_point=zero_point), "lsq"
