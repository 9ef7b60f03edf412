"""Graph edits shared by the quantizer passes.

Every quantizer pass does the same two rewrites: put an activation quantizer in
front of a compute layer, and give the layer a weight quantizer. Keeping them here
means the naming of inserted modules and the records they carry are uniform, which
the dumps, reports and backends rely on.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .. import ir
from ..nn.qat import with_weight_quant


def act_quantizer_name(layer: fx.Node) -> str:
    """Name of the activation quantizer feeding ``layer``.

    Derived from the node name, not the module path: a module called at two sites
    is two nodes and needs two quantizers.
    """
    return f"{layer.name}_act"


def input_quantizer(layer: fx.Node) -> fx.Node | None:
    """The activation-quantizer node in front of ``layer``, if any."""
    return layer.args[0] if ir.input_act(layer) is not None else None


def set_act_quantizer(gm: fx.GraphModule, layer: fx.Node, quantizer: nn.Module, record: ir.ActQuant) -> fx.Node:
    """Quantize ``layer``'s input with ``quantizer``, replacing any quantizer there."""
    existing = input_quantizer(layer)
    target = act_quantizer_name(layer)
    gm.add_submodule(target, quantizer)
    if existing is not None:
        existing.meta[ir.ACT] = record
        return existing
    src = layer.args[0]
    with gm.graph.inserting_before(layer):
        qnode = gm.graph.call_module(target, (src,))
    qnode.name = f"{layer.name}_act"
    layer.replace_input_with(src, qnode)
    if "tensor_meta" in src.meta:
        qnode.meta["tensor_meta"] = src.meta["tensor_meta"]
    qnode.meta[ir.ACT] = record
    return qnode


def set_weight_quantizer(gm: fx.GraphModule, layer: fx.Node, quantizer: nn.Module, record: ir.WeightQuant) -> None:
    """Make ``layer`` compute with ``quantizer(weight)``."""
    module = gm.get_submodule(layer.target)
    gm.add_submodule(layer.target, with_weight_quant(module, quantizer))
    layer.meta[ir.WEIGHT] = record


def layer_bits(layer: fx.Node, spec) -> tuple[int, int]:
    """(weight bits, activation bits) of ``layer`` after pinning and overrides."""
    pin = ir.find(layer, ir.PIN, ir.Pin)
    return spec.layer_bits(layer.name, pin.bits if pin else None, str(layer.target))
