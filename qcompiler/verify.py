"""The IR verifier: a table of rules a compiled graph must satisfy.

Each rule looks at one node and returns ``None`` (fine, or no opinion) or what is
wrong; the first failure raises :class:`IRError` quoting the node. Structural rules
hold after every pass (the pass manager checks them in tests and with ``--debug``);
the ``final`` rules hold once the pipeline has finished (``compile`` checks them,
and so does every backend before it reads the graph).

Example:
    >>> import qcompiler
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(32, 4))
    >>> verify_graph(c.module, final=True)  # compile already did; nothing is wrong
    >>> c.module.get_submodule("_2_act").step.data.fill_(float("nan"))
    tensor(nan)
    >>> verify_graph(c.module)
    Traceback (most recent call last):
    ...
    qcompiler.verify.IRError: IR rule 'activation quantizer matches its record' fails at `%_2_act ...`: step nan is not positive and finite
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from . import ir
from .analysis import FLOAT, GRID, Domain, join_operands, tensor_domains
from .errors import QCompileError
from .quantizers.adder import QAdderConv2d
from .quantizers.asq import ASQQuantizer
from .quantizers.power_grid import PowerGridQuantizer
from .quantizers.uniform import UniformQuantizer, positive


class IRError(QCompileError):
    """The compiled graph breaks an IR rule (a pass bug, or a hand-edited graph)."""


@dataclass
class Facts:
    """What rules may read besides the node."""

    gm: fx.GraphModule
    domains: dict[fx.Node, Domain]

    def grid_of(self, node: object) -> str | None:
        """The quantizer whose grid ``node``'s output is on, or None (not on a grid, or not a node)."""
        domain = self.domains.get(node) if isinstance(node, fx.Node) else None
        return domain.grid if domain is not None and domain.kind == GRID else None


Check = Callable[[Facts, fx.Node], "str | None"]


@dataclass(frozen=True)
class Rule:
    name: str
    check: Check
    final: bool = False


def _finite_positive(t: torch.Tensor) -> bool:
    t = t.detach()
    return bool(torch.isfinite(t).all()) and bool((positive(t) > 0).all()) and bool((t != 0).all())


def act_quantizer_module(f: Facts, node: fx.Node) -> str | None:
    rec = node.meta.get(ir.ACT)
    if rec is None:
        return None
    q = f.gm.get_submodule(node.target)
    if not isinstance(q, UniformQuantizer):
        return f"its module {node.target!r} is a {type(q).__name__}, not an activation quantizer"
    if (q.bits, q.signed, getattr(q, "zero_point", None)) != (rec.bits, rec.signed, rec.zero_point):
        module_kind = ir.grid_kind(q.signed, getattr(q, "zero_point", None))
        return f"record says {rec.bits}-bit {rec.grid_kind}, module is {q.bits}-bit {module_kind}"
    if (rec.method == "asq") != isinstance(q, ASQQuantizer):
        return f"record says method {rec.method!r}, module is {type(q).__name__}"
    module_axis = q.channel_axis if q.step.dim() else None
    if rec.channel_axis != module_axis:
        return f"record says channel axis {rec.channel_axis}, module has {module_axis}"
    if not _finite_positive(q.step):
        return f"step {q.step.detach().tolist()} is not positive and finite"
    return None


def quantized_layer_records(f: Facts, node: fx.Node) -> str | None:
    if ir.LAYER not in node.meta:
        return None
    info = ir.get(node, ir.LAYER, ir.LayerInfo)
    module = f.gm.get_submodule(node.target)
    wq = ir.find(node, ir.WEIGHT, ir.WeightQuant)
    if info.kind == "adder2d":
        if isinstance(module, QAdderConv2d) != (ir.ADDER_Q in node.meta) or (wq is None) != (ir.ADDER_Q not in node.meta):
            return "adder layer: module, qc.adder_q and qc.weight records disagree"
        if isinstance(module, QAdderConv2d):
            if not _finite_positive(module.act_steps):
                return "adder group steps are not positive and finite"
            if tuple(module.act_steps.double().tolist()) != ir.get(node, ir.ADDER_Q, ir.AdderScales).act_steps:
                return "qc.adder_q act_steps differ from the module's act_steps buffer"
        return None
    has_quant = hasattr(module, "weight_quant")
    if wq is None:
        return "layer has a weight quantizer but no qc.weight record" if has_quant else None
    if not has_quant:
        return f"qc.weight record but module {node.target!r} has no weight quantizer"
    q = module.weight_quant
    if q.bits != wq.bits or (wq.grid in ("pot", "post")) != isinstance(q, PowerGridQuantizer):
        return f"qc.weight says {wq.grid} {wq.bits}-bit, module's quantizer is {q}"
    scale = q.alpha if isinstance(q, PowerGridQuantizer) else q.step
    if not _finite_positive(scale):
        return "weight steps are not positive and finite"
    if ir.input_act(node) is None and info.kind != "embedding":  # an embedding reads indices, not activations
        return "quantized layer reads no activation quantizer"
    return None


def frozen_records_current(f: Facts, node: fx.Node) -> str | None:
    from .passes.freeze import frozen_act, same_record, weight_codes  # freeze imports this module's peers

    if ir.STEP in node.meta and not same_record(node.meta[ir.STEP], frozen_act(f.gm.get_submodule(node.target))):
        return "qc.step differs from the quantizer's current values; run freeze"
    if ir.CODES in node.meta and not same_record(node.meta[ir.CODES], weight_codes(f.gm, node)):
        return "qc.codes differs from the layer's current weights; run freeze"
    return None


def no_unrecorded_float(f: Facts, node: fx.Node) -> str | None:
    if f.domains[node].kind == FLOAT and ir.FLOAT not in node.meta:
        return "computes in float with no qc.float record saying why"
    return None


def join_record_matches(f: Facts, node: fx.Node) -> str | None:
    rec = node.meta.get(ir.JOIN)
    if rec is None:
        return None
    grids = tuple(f.grid_of(a) for a in join_operands(node) or [])
    if grids != rec.inputs:
        return f"qc.join says operand grids {rec.inputs}, graph has {grids}"
    return None


def matmul_record_matches(f: Facts, node: fx.Node) -> str | None:
    rec = node.meta.get(ir.MATMUL)
    if rec is None:
        return None
    grids = tuple(f.grid_of(a) for a in node.args)
    if grids != rec.inputs:
        return f"qc.matmul says operand grids {rec.inputs}, graph has {grids}"
    return None


def lookup_record_matches(f: Facts, node: fx.Node) -> str | None:
    rec = node.meta.get(ir.LOOKUP)
    if rec is None:
        return None
    grid = f.grid_of(node.args[0] if node.args else None)
    if grid != rec.input:
        return f"qc.lookup says its input is on grid {rec.input!r}, graph has {grid!r}"
    return None


def steps_finite(f: Facts, node: fx.Node) -> str | None:
    frozen = node.meta.get(ir.STEP)
    if frozen is not None:
        steps = np.asarray(frozen.step, dtype=np.float64)
        if not (np.isfinite(steps).all() and (steps > 0).all()):
            return f"frozen step {frozen.step} is not positive and finite"
    return None


def channel_steps_read_by_joins(f: Facts, node: fx.Node) -> str | None:
    """Per-channel activation steps are requantization multipliers of a join: a layer
    reading such codes would need a step per input channel, which no backend has."""
    rec = node.meta.get(ir.ACT)
    if rec is None or rec.channel_axis is None:
        return None
    others = [u.name for u in node.users if join_operands(u) is None]
    if others:
        return f"has one step per channel but {others[0]!r}, not a join, reads it"
    return None


RULES: tuple[Rule, ...] = (
    Rule("activation quantizer matches its record", act_quantizer_module),
    Rule("quantized layer has its records and input quantizer", quantized_layer_records),
    Rule("join record matches the graph", join_record_matches),
    Rule("matmul record matches the graph", matmul_record_matches),
    Rule("lookup record matches the graph", lookup_record_matches),
    Rule("frozen step is positive and finite", steps_finite),
    Rule("per-channel activation steps are read only by joins", channel_steps_read_by_joins),
    Rule("no unrecorded float edge", no_unrecorded_float, final=True),
    Rule("frozen records equal module state", frozen_records_current, final=True),
)


def verify_graph(gm: fx.GraphModule, final: bool = False) -> None:
    """Check every rule (``final``: also those of a finished pipeline) on every node."""
    facts = Facts(gm, tensor_domains(gm))
    for node in gm.graph.nodes:
        for rule in RULES:
            if rule.final and not final:
                continue
            problem = rule.check(facts, node)
            if problem is not None:
                raise IRError(f"IR rule {rule.name!r} fails at `{node.format_node()}`: {problem}")


def unrecorded_float(gm: fx.GraphModule) -> list[str]:
    """Names of nodes computed in float without a ``qc.float`` record."""
    return [n.name for n, d in tensor_domains(gm).items() if d.kind == FLOAT and ir.FLOAT not in n.meta]


__all__ = ["IRError", "RULES", "Rule", "verify_graph", "unrecorded_float"]
