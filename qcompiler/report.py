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
        aq = ir.input_act(layer)
        pin = ir.find(layer, ir.PIN, ir.Pin)
        adder = ir.find(layer, ir.ADDER_Q, ir.AdderScales)
        act_bits = aq.bits if aq else (adder.act_bits if adder else None)
        if aq:
            act_quantizer = f"{aq.method} {'signed' if aq.signed else 'unsigned'}"
        elif adder:
            act_quantizer = f"{len(adder.group_ranges)} shared scale(s)"
        else:
            act_quantizer = "-"
        rows.append(
            LayerReport(
                name=layer.name,
                kind=info.kind,
                weight_bits=wq.bits if wq else None,
                act_bits=act_bits,
                weight_quantizer=f"{wq.grid} {wq.granularity}" if wq else "-",
                act_quantizer=act_quantizer,
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


@dataclass(frozen=True)
class AdapterOverhead:
    """ASQ's extra cost at one bit width, as in the ASQ paper's Table 1."""

    bits: int
    param_pct: float  # adapter parameter bits / quantized model parameter bits
    ops_pct: float  # adapter operations / quantized model operations (OPS * bits / 32)


ADAPTER_PARAM_BITS = 8  # adapters stored as 8-bit integers, like the pinned layers


def asq_overhead(gm: fx.GraphModule, bit_widths: tuple[int, ...] = (8, 4, 3, 2)) -> tuple[AdapterOverhead, ...]:
    """Adapter parameters and operations relative to the quantized model, per bit width.

    Model parameters and operations are counted as in the paper (eqs. 10-13:
    conv/linear weights plus linear biases; multiply-accumulates); a b-bit model
    stores ``params * b`` bits and costs ``OPS * b / 32`` 32-bit-equivalent operations.
    Adapter operations are multiplications (eq. 13) in full precision, so they are
    not scaled. With 8-bit adapter storage and first/last layers pinned, the zoo's
    ResNet-18 at 224x224 gives 2.63 % / 0.067 % at 8 bits (paper: 2.67 % / 0.04 %;
    the paper does not say how it counts adapter operations).
    """
    model_params = model_ops = adapter_params = adapter_ops = 0
    for layer in ir.compute_layers(gm):
        info = ir.get(layer, ir.LAYER, ir.LayerInfo)
        model_params += info.params if info.kind == "linear" else info.params - (info.out_channels if info.has_bias else 0)
        model_ops += info.macs
        act = ir.input_act(layer)
        if act is not None and act.method == "asq":
            adapter = gm.get_submodule(act.module).adapter
            adapter_params += adapter.params()
            adapter_ops += adapter.ops()
    rows = []
    for b in bit_widths:
        param_pct = 100.0 * adapter_params * ADAPTER_PARAM_BITS / max(model_params * b, 1)
        ops_pct = 100.0 * adapter_ops / max(model_ops * b / 32, 1)
        rows.append(AdapterOverhead(b, param_pct, ops_pct))
    return tuple(rows)


def overhead_table(rows: tuple[AdapterOverhead, ...]) -> str:
    return _table(
        ("bits", "adapter params %", "adapter ops %"),
        [(str(r.bits), f"{r.param_pct:.2f}", f"{r.ops_pct:.3f}") for r in rows],
    )


@dataclass(frozen=True)
class GroupScaleCost:
    """Extra operations of an adder layer's ``g`` scale groups over one scale."""

    layer: str
    in_channels: int
    groups: int
    exact_pct: float  # from the supplement's eq. (2) with this layer's shapes
    closed_form_pct: float  # the supplement's (g - 1) / (18c + 4), for 3x3 layers


def adder_group_cost(gm: fx.GraphModule) -> tuple[GroupScaleCost, ...]:
    """Relative FLOPs added by group scales, per quantized adder layer (supplement, Prop. 2).

    Eq. (2): ``2hw(c_in d^2 + 1) c_out + c_in d^2 c_out + g h w c_in + h_out w_out c_out``;
    going from one scale to ``g`` adds ``(g - 1) h w c_in``.
    """
    rows = []
    for layer in ir.compute_layers(gm):
        scales = ir.find(layer, ir.ADDER_Q, ir.AdderScales)
        if scales is None:
            continue
        info = ir.get(layer, ir.LAYER, ir.LayerInfo)
        g = len(scales.group_ranges)
        c_in, c_out = info.in_channels, info.out_channels
        h, w = info.input_shape[1:3]
        d2 = info.kernel_size[0] * info.kernel_size[1]
        h_out, w_out = info.output_shape[1:3]
        one_scale = 2 * h * w * (c_in * d2 + 1) * c_out + c_in * d2 * c_out + h * w * c_in + h_out * w_out * c_out
        rows.append(GroupScaleCost(
            layer.name, c_in, g,
            exact_pct=100.0 * (g - 1) * h * w * c_in / one_scale,
            closed_form_pct=100.0 * (g - 1) / (18 * c_in + 4),
        ))
    return tuple(rows)


def group_cost_table(rows: tuple[GroupScaleCost, ...]) -> str:
    return _table(
        ("adder layer", "c", "g", "extra FLOPs %", "(g-1)/(18c+4) %"),
        [(r.layer, str(r.in_channels), str(r.groups), f"{r.exact_pct:.3f}", f"{r.closed_form_pct:.3f}") for r in rows],
    )
