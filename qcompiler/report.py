"""Per-layer and per-pass reports of a compile, as records and as text tables.

A pass with something of its own to report (a method's cost table) returns a
:class:`ReportSection` from ``Pass.report_section``; the report collects those of
the passes that ran, so nothing here knows any pass by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx as fx

from . import ir
from .spec import INITS, QuantSpec

if TYPE_CHECKING:  # passes import this module for ReportSection; no cycle at run time
    from .passes.manager import PassRun


MATMUL_KIND = "matmul"  # a product of two activations: a row with no weight
PRODUCT_KIND = "mul"  # an elementwise product of two activations (a gate): a row with no weight


@dataclass(frozen=True)
class LayerReport:
    """One compute layer as the compiled model will run it."""

    name: str
    kind: str
    weight_bits: int | None  # None: kept in float
    act_bits: int | None
    weight_quantizer: str
    act_quantizer: str
    pinned: str  # why it is pinned, or ""
    params: int
    macs: int
    float_reason: str = ""  # why an op with weights stays in float (no pass quantizes it), or ""


@dataclass(frozen=True)
class ReportSection:
    """One pass's own table in the report: a title and the table as text.

    Example:
        >>> print(ReportSection("Sizes", text_table(("name", "n"), [("a", "1")])).text())
        Sizes:
        name  n
        ----  -
        a     1
    """

    title: str
    table: str

    def text(self) -> str:
        return f"{self.title}:\n{self.table}"


@dataclass(frozen=True)
class CompileReport:
    layers: tuple[LayerReport, ...]
    passes: tuple[PassRun, ...]
    trace_seconds: float
    sections: tuple[ReportSection, ...] = ()  # from the passes that ran, in pipeline order
    joins: int = 0  # residual adds / concats on integer grids
    residual_bits: int | None = None  # width of the residual stream, when joins are quantized
    channel_operands: int = 0  # join operands with one step per channel (QuantSpec.per_channel_joins)
    float_regions: tuple[tuple[str, str], ...] = ()  # (node, reason) of every node computed in float
    unrecorded_float: tuple[str, ...] = ()  # float nodes with no reason recorded: always empty after compile

    @property
    def compile_seconds(self) -> float:
        """Trace plus every pass."""
        return self.trace_seconds + sum(p.seconds for p in self.passes)

    def layer_table(self) -> str:
        head = ("layer", "kind", "w-bits", "a-bits", "weight quantizer", "act quantizer", "pinned")
        rows = [
            (
                r.name, r.kind,
                str(r.weight_bits or ("-" if r.kind in (MATMUL_KIND, PRODUCT_KIND) else "fp32")), str(r.act_bits or "fp32"),
                r.weight_quantizer, r.act_quantizer, r.pinned,
            )
            for r in self.layers
        ]
        return text_table(head, rows)

    def pass_table(self) -> str:
        rows = [("trace", f"{self.trace_seconds * 1e3:.1f}", "")]
        rows += [(p.name, f"{p.seconds * 1e3:.1f}", "yes" if p.modified else "no") for p in self.passes]
        return text_table(("pass", "ms", "changed"), rows)

    def domain_summary(self) -> str:
        """Where the compiled model leaves integers, if anywhere, and the residual stream's width."""
        if self.residual_bits is not None:
            lines = [f"joins (residual adds, concats): {self.joins}, on a {self.residual_bits}-bit residual stream"
                     + (f"; {self.channel_operands} operand(s) with one step per channel" if self.channel_operands else "")]
        else:
            lines = [f"joins (residual adds, concats): {self.joins}, not quantized"]
        lines.append(f"unrecorded float edges: {len(self.unrecorded_float)}")
        if not self.float_regions:
            lines.append("float regions: none (every edge after the input quantizer is on an integer grid)")
        else:
            lines.append(f"float regions: {len(self.float_regions)} node(s)")
            lines.append(text_table(("node", "why it runs in float"), list(self.float_regions)))
        return "\n".join(lines)

    def text(self) -> str:
        """The whole report as the CLI prints it and ``report.txt`` holds it."""
        parts = [self.layer_table(), self.domain_summary(), self.pass_table(), *(s.text() for s in self.sections)]
        return "\n\n".join(parts)


def build_report(gm: fx.GraphModule, passes: Sequence[PassRun], trace_seconds: float, spec: QuantSpec) -> CompileReport:
    """Read the final records of ``gm`` into a report, with the sections of the passes that ran.

    Runs ``freeze`` first, so the report never shows a stale value.
    """
    from .passes.freeze import freeze  # the passes import this module
    from .verify import unrecorded_float

    freeze(gm)
    rows = []
    for layer in ir.compute_layers(gm):
        info = ir.get(layer, ir.LAYER, ir.LayerInfo)
        wq = ir.find(layer, ir.WEIGHT, ir.WeightQuant)
        aq = ir.input_act(layer)
        pin = ir.find(layer, ir.PIN, ir.Pin)
        scales = ir.find(layer, ir.ADDER_Q, ir.AdderScales)
        act_bits = aq.bits if aq else (scales.act_bits if scales else None)
        if aq:
            act_quantizer = f"{aq.method} {aq.grid_kind}, {aq.init} init" + ("" if aq.learned else ", held")
        elif scales:
            act_quantizer = f"{len(scales.group_ranges)} shared scale(s)"
        else:
            act_quantizer = "-"
        rows.append(
            LayerReport(
                name=layer.name,
                kind=info.kind,
                weight_bits=wq.bits if wq else None,
                act_bits=act_bits,
                weight_quantizer=f"{wq.grid} {wq.granularity}{init_note(wq)}{shared_note(layer)}" if wq else "-",
                act_quantizer=act_quantizer,
                pinned=pin.reason if pin and wq else "",  # a float layer is not held at any width
                params=info.params,
                macs=info.macs,
            )
        )
    rows += matmul_rows(gm)
    rows += float_weight_rows(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    rows.sort(key=lambda r: order.get(r.name, 0))
    sections = (run.pass_type.report_section(gm, spec) for run in passes)
    joins = [n for n in gm.graph.nodes if ir.JOIN in n.meta]
    return CompileReport(
        tuple(rows), tuple(passes), trace_seconds, tuple(s for s in sections if s is not None),
        joins=len(joins), residual_bits=joins[0].meta[ir.JOIN].bits if joins else None,
        channel_operands=sum(1 for n in gm.graph.nodes if ir.ACT in n.meta and n.meta[ir.ACT].channel_axis is not None),
        float_regions=tuple((n.name, n.meta[ir.FLOAT].reason) for n in gm.graph.nodes if ir.FLOAT in n.meta),
        unrecorded_float=tuple(unrecorded_float(gm)),
    )


def init_note(wq: ir.WeightQuant) -> str:
    """``, mse init`` for a grid whose steps or clips were searched or set by the spec's
    ``init``; nothing for adder grids, whose scales come from their group ranges."""
    return f", {wq.init} init" if wq.init in INITS else ""


def shared_note(layer: fx.Node) -> str:
    """`` (shared: a, b)`` when the layer's module (so its weights and weight grid) serves several call sites."""
    from .passes.rewrite import call_sites

    sites = call_sites(layer)
    return f" (shared: {', '.join(n.name for n in sites)})" if len(sites) > 1 else ""


def matmul_rows(gm: fx.GraphModule) -> list[LayerReport]:
    """A row for every quantized product of two activations (``qc.matmul``): no weight, two input grids."""
    rows = []
    for node in gm.graph.nodes:
        rec = ir.find(node, ir.MATMUL, ir.MatMul)
        if rec is None:
            continue
        acts = [ir.get(a, ir.ACT, ir.ActQuant) for a in node.args]
        signs = " x ".join(a.grid_kind for a in acts)
        out = node.meta.get("tensor_meta")
        if rec.elementwise:  # one multiply per output element
            depth = 1
        else:
            depth = node.args[0].meta["tensor_meta"].shape[-1] if "tensor_meta" in node.args[0].meta else 0
        macs = math.prod(out.shape[1:]) * depth if out is not None else 0  # per sample, as for layers
        rows.append(LayerReport(name=node.name, kind=PRODUCT_KIND if rec.elementwise else MATMUL_KIND,
                                weight_bits=None, act_bits=rec.bits,
                                weight_quantizer="- (two activations)", act_quantizer=f"{acts[0].method} {signs}",
                                pinned="", params=0, macs=macs))
    return rows


def float_weight_rows(gm: fx.GraphModule) -> list[LayerReport]:
    """A row for every op with weights that stays in float, with the reason: never a silent float layer."""
    from .analysis import float_weight_ops
    from .train import QUANTIZER_TYPES

    return [
        LayerReport(name=op.node, kind=op.kind, weight_bits=None, act_bits=None, weight_quantizer=f"float: {op.reason}",
                    act_quantizer="-", pinned="", params=op.params, macs=0, float_reason=op.reason)
        for op in float_weight_ops(gm, skip=QUANTIZER_TYPES)
    ]


def text_table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Left-aligned columns under a dashed rule.

    Example:
        >>> print(text_table(("bits", "ops %"), [("8", "0.067"), ("4", "0.134")]))
        bits  ops %
        ----  -----
        8     0.067
        4     0.134
    """
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)
