"""``asq``: adaptive-step activation quantizers (ASQ) with uniform weights.

Every non-pinned conv / linear input gets an :class:`ASQQuantizer` (learned step
times a per-sample factor from a small adapter, docs/design.md §4.3) and every weight a
per-channel LSQ quantizer, so ``--passes asq`` is the paper's "ASQ" scheme and
``asq,post`` its "ASQ+POST". Pinned layers keep an 8-bit LSQ input quantizer: an
adapter there would cost more than it could gain at 8 bits. The pass's report
section is the adapters' overhead (:func:`asq_overhead`, the paper's Table 1).

Each adapter draws its initial weights from its own generator, seeded from
``spec.seed`` and the layer's name, so a seeded compile is the same on every run
and one layer's adapter does not depend on which layers come before it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .. import ir
from ..quantizers.asq import ASQQuantizer
from ..report import ReportSection, text_table
from ..spec import QuantSpec
from .base import STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .rewrite import lsq_act_quantizer, quantize_multiply_layers


def adapter_generator(seed: int, layer_name: str) -> torch.Generator:
    """The generator for ``layer_name``'s adapter: the same on every run and platform.

    ``zlib.crc32`` rather than ``hash()``, which is salted per process for strings.

    Example:
        >>> a, b = adapter_generator(0, "conv1"), adapter_generator(0, "conv1")
        >>> torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
        True
        >>> adapter_generator(0, "conv1").initial_seed() != adapter_generator(1, "conv1").initial_seed()
        True
    """
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{layer_name}".encode()))


def asq_act_quantizer(
    layer: fx.Node, info: ir.LayerInfo, bits: int, grid: tuple[bool, int | None], ctx: PassContext
) -> tuple[nn.Module, str]:
    if ir.PIN in layer.meta:
        return lsq_act_quantizer(layer, info, bits, grid, ctx)
    signed, zero_point = grid
    generator = adapter_generator(ctx.spec.seed, layer.name)
    # A Linear reads features on the last axis, maybe after token axes: its adapter pools over the tokens.
    feature_axis = -1 if info.kind == "linear" else 1
    return ASQQuantizer(bits, signed=signed, channels=info.in_channels, generator=generator,
                        feature_axis=feature_axis, zero_point=zero_point), "asq"


class ASQ(Pass):
    name = "asq"
    purpose = "per-sample adaptive activation steps (ASQ) and uniform per-channel weights"
    stage = STAGE_ACTIVATIONS
    requires = frozenset({"ranges"})
    produces = frozenset({"act-quant", "weight-quant"})
    conflicts = frozenset({"lsq"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, quantize_multiply_layers(gm, ctx, asq_act_quantizer))

    @classmethod
    def report_section(cls, gm: fx.GraphModule, spec: QuantSpec) -> ReportSection:
        # the paper's Table 1 widths, plus the one this model was compiled at
        bit_widths = tuple(sorted({8, 4, 3, 2, spec.act_bits}, reverse=True))
        return ReportSection("ASQ adapter overhead (ASQ paper, Table 1)", overhead_table(asq_overhead(gm, bit_widths)))


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
    return text_table(
        ("bits", "adapter params %", "adapter ops %"),
        [(str(r.bits), f"{r.param_pct:.2f}", f"{r.ops_pct:.3f}") for r in rows],
    )
