"""``asq``: adaptive-step activation quantizers (ASQ) with uniform weights.

Every non-pinned conv / linear input gets an :class:`ASQQuantizer` (learned step
times a per-sample factor from a small adapter, DESIGN.md §3.2) and every weight a
per-channel LSQ quantizer, so ``--passes asq`` is the paper's "ASQ" scheme and
``asq,post`` its "ASQ+POST". Pinned layers keep an 8-bit LSQ input quantizer: an
adapter there would cost more than it could gain at 8 bits.

Each adapter draws its initial weights from its own generator, seeded from
``spec.seed`` and the layer's name, so a seeded compile is the same on every run
and one layer's adapter does not depend on which layers come before it.
"""

from __future__ import annotations

import functools
import zlib

import torch
import torch.fx as fx
from torch import nn

from .. import ir
from ..quantizers.asq import ASQQuantizer
from .base import STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .lsq import lsq_act_quantizer, quantize_multiply_layers


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
    layer: fx.Node, info: ir.LayerInfo, bits: int, rng: ir.TensorRange, *, seed: int = 0
) -> tuple[nn.Module, str]:
    if ir.PIN in layer.meta:
        return lsq_act_quantizer(layer, info, bits, rng)
    generator = adapter_generator(seed, layer.name)
    return ASQQuantizer(bits, signed=rng.signed, channels=info.in_channels, generator=generator), "asq"


class ASQ(Pass):
    name = "asq"
    purpose = "per-sample adaptive activation steps (ASQ) and uniform per-channel weights"
    stage = STAGE_ACTIVATIONS
    requires = frozenset({"ranges"})
    produces = frozenset({"act-quant", "weight-quant"})
    conflicts = frozenset({"lsq"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        make = functools.partial(asq_act_quantizer, seed=ctx.spec.seed)
        return PassResult(gm, quantize_multiply_layers(gm, ctx, make))
