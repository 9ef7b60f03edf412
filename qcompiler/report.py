"""Per-layer and per-pass reports of a compile, as records and as text tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from . import ir
from .passes.manager import PassRun


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


@dataclass(frozen=True)
class CompileReport:
    layers: tuple[LayerReport, ...]
    passes: tuple[PassRun, ...]
    trace_seconds: float

    @property
    def compile_seconds(self) -> float:
        """Trace plus every pass."""
        return self.trace_seconds + sum(p.seconds for p in self.passes)

    def layer_table(self) -> str:
        head = ("layer", "kind", "w-bits", "a-bits", "weight quantizer", "act quantizer", "pinned")
        rows = [
            (
                r.name, r.kind,
                str(r.weight_bits or "fp32"), str(r.act_bits or "fp32"),
                r.weight_quantizer, r.act_quantizer, r.pinned,
            )
            for r in self.layers
        ]
        return _table(head, rows)

    def pass_table(self) -> str:
        rows = [("trace", f"{self.trace_seconds * 1e3:.1f}", "")]
        rows += [(p.name, f"{p.seconds * 1e3:.1f}", "yes" if p.modified else "no") for p in self.passes]
        return _table(("pass", "ms", "changed"), rows)


def build_report(gm: fx.GraphModule, passes: list[PassRun], trace_seconds: float) -> CompileReport:
    """Read the final records of ``gm`` into a report."""
    rows = []
    for layer in ir.compute_layers(gm):
        info = ir.get(layer, ir.LAYER, ir.LayerInfo)
        wq = ir.find(layer, ir.WEIGHT, ir.WeightQuant)
        src = layer.args[0]
        aq = ir.find(src, ir.ACT, ir.ActQuant) if hasattr(src, "meta") else None
        pin = ir.find(layer, ir.PIN, ir.Pin)
        rows.append(
            LayerReport(
                name=layer.name,
                kind=info.kind,
                weight_bits=wq.bits if wq else None,
                act_bits=aq.bits if aq else None,
                weight_quantizer=f"{wq.grid} {wq.granularity}" if wq else "-",
                act_quantizer=f"{aq.method} {'signed' if aq.signed else 'unsigned'}" if aq else "-",
                pinned=pin.reason if pin else "",
                params=info.params,
                macs=info.macs,
            )
        )
    return CompileReport(tuple(rows), tuple(passes), trace_seconds)


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)
