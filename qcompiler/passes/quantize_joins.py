"""``quantize-joins``: put every residual add and concat on integer grids.

An integer accelerator adds or concatenates codes, rescaled to a common step, so
each operand of a join must already be on a grid, and the result must be
requantized before anything reads it. This pass makes the fake-quant graph do
exactly that:

  1. the result of each add/sub/concat (taken after any ReLU that follows it, so the
     codes can be unsigned) gets a quantizer of ``residual_bits`` (8 by default: the
     residual stream), and every reader of that tensor reads the quantizer;
  2. each operand not yet on a grid (a batch norm's output, a tensor only layers
     had quantized) gets one too;
  3. a tensor gets one quantizer: if one of at least the residual width is already
     there, the join shares it; otherwise the narrower layer-input quantizers on
     the tensor are moved behind the new one (they requantize its codes);
  4. with ``per_channel_joins``, an operand that is a batch norm's output read by
     nothing else gets one step per channel (the norm's gains give its channels
     different ranges; the join's requantization multipliers carry them), each
     started from the calibration samples as the spec's ``init`` says;
  5. each join records the grid of every operand and of its result (``qc.join``).

The new quantizers are learned-step (LSQ) quantizers, signed, unsigned or (with
``asymmetric_acts``) asymmetric by :func:`qcompiler.quantizers.init.choose_grid`, whose steps start as the spec's
``init`` says (:func:`join_init`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from .. import ir
from ..analysis import GRID, is_constant_join, is_identity, join_kind, join_operands, tensor_domains
from ..distributed import all_reduce_values
from ..quantizers import UniformQuantizer, init
from ..spec import QuantSpec
from .base import CALIBRATION_DATA, STAGE_JOIN, Pass, PassContext, PassResult
from .calibrate import run_calibration, sample_keeper
from .observe import observe_ranges
from .rewrite import init_act_step, insert_quantizer


def join_init(spec_init: str) -> str:
    """How a join quantizer's step starts: as the spec says, except that LSQ's
    ``2 mean|x| / sqrt(p)``, a start for layer inputs that QAT then trains, would clip
    the residual stream hard; there the step reaches ``max|x|`` instead, as it always did.

    >>> join_init("mse"), join_init("lsq")
    ('mse', 'max')
    """
    return "max" if spec_init == "lsq" else spec_init


SAMPLE_BYTES = 8 << 20  # calibration samples kept per per-channel quantizer to fit its steps

_RELU = (nn.ReLU,)
_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu}


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _RELU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target == "relu"


def result_tensor(gm: fx.GraphModule, join: fx.Node) -> fx.Node:
    """The join's result after the ReLUs that alone read it."""
    node = join
    while len(node.users) == 1:
        (user,) = node.users
        if not _is_relu(gm, user) or ir.ACT in user.meta:
            break
        node = user
    return node


def passthrough_source(gm: fx.GraphModule, reader: fx.Node, operand: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``(reader, tensor)``: ``operand`` seen through identity modules (an empty shortcut).

    An identity shortcut reads the very tensor the block's first layer reads; the
    quantizer belongs on that tensor, so both see one set of codes.
    """
    while operand.op == "call_module" and is_identity(gm.get_submodule(operand.target)) and len(operand.users) == 1:
        reader, operand = operand, operand.args[0]
    return reader, operand


class QuantizeJoins(Pass):
    name = "quantize-joins"
    purpose = "one quantizer on every tensor entering or leaving a residual add or concat"
    stage = STAGE_JOIN
    requires = frozenset({CALIBRATION_DATA})
    produces = frozenset({"join-quant"})
    quiet_when_unchanged = True

    def __init__(self, bits: int = 8, init: str = "mse", asymmetric: bool = False, per_channel: bool = False) -> None:
        self.bits, self.init, self.asymmetric, self.per_channel = bits, init, asymmetric, per_channel

    @classmethod
    def from_spec(cls, spec: QuantSpec) -> QuantizeJoins:
        return cls(bits=spec.residual_bits, init=join_init(spec.init), asymmetric=spec.asymmetric_acts,
                   per_channel=spec.per_channel_joins)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        domains = tensor_domains(gm)
        joins = [n for n in gm.graph.nodes if join_operands(n) is not None and ir.JOIN not in n.meta
                 and not is_constant_join(n, domains)]
        quantized = any(ir.ACT in n.meta or ir.ADDER_Q in n.meta for n in gm.graph.nodes)
        if not joins or not quantized:
            return PassResult(gm, False)
        results = {j: result_tensor(gm, j) for j in joins}
        watched = {*results.values(), *(passthrough_source(gm, j, a)[1] for j in joins for a in join_operands(j))}
        observe_ranges(gm, ctx, [n for n in watched if ir.RANGE not in n.meta], self.name)

        for join in joins:  # results first: they are the next joins' operands
            self.quantize_tensor(gm, results[join], list(results[join].users))
        domains = tensor_domains(gm)
        per_channel: dict[fx.Node, fx.Node] = {}  # tensor -> its per-channel quantizer
        for join in joins:
            for operand in join_operands(join):
                if domains[operand].kind != GRID:
                    reader, tensor = passthrough_source(gm, join, operand)
                    channels = self.channels(gm, tensor, reader)
                    q = self.quantize_tensor(gm, tensor, [reader], channels)
                    if channels:
                        per_channel[tensor] = q
        if per_channel:
            self.fit_channel_steps(gm, ctx, per_channel)
        domains = tensor_domains(gm)
        for join in joins:
            out = next(u for u in results[join].users if self.is_wide(u))
            join.meta[ir.JOIN] = ir.Join(
                kind=join_kind(join), inputs=tuple(domains[a].grid for a in join_operands(join)),
                output=out.name, bits=self.bits,
            )
        return PassResult(gm, True)

    def is_wide(self, node: fx.Node) -> bool:
        """A per-tensor quantizer at least as wide as the residual stream (ASQ's per-sample steps are not)."""
        rec = node.meta.get(ir.ACT)
        return rec is not None and rec.method == "lsq" and rec.bits >= self.bits and rec.channel_axis is None

    def channels(self, gm: fx.GraphModule, tensor: fx.Node, reader: fx.Node) -> int | None:
        """How many channels ``tensor`` gets steps for: with ``per_channel``, a batch norm's
        ``(N, C, ...)`` output that only ``reader`` (the join) reads; otherwise ``None``."""
        if not self.per_channel or set(tensor.users) != {reader} or tensor.op != "call_module":
            return None
        if not isinstance(gm.get_submodule(tensor.target), nn.modules.batchnorm._BatchNorm):
            return None
        meta = tensor.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return int(shape[1]) if shape is not None and len(shape) >= 2 and int(shape[1]) > 1 else None

    def fit_channel_steps(self, gm: fx.GraphModule, ctx: PassContext, quantizers: dict[fx.Node, fx.Node]) -> None:
        """Start each per-channel quantizer's steps from its tensor's calibration samples (the
        first ones, up to ``SAMPLE_BYTES``); in a distributed compile the ranks' steps are
        averaged, so every rank starts alike."""
        samples: dict[str, list[torch.Tensor]] = {t.name: [] for t in quantizers}
        run_calibration(gm, ctx.calib_batches, {k: sample_keeper(v, SAMPLE_BYTES) for k, v in samples.items()},
                        self.name, ctx.progress, float_=True)
        modules = [gm.get_submodule(q.target) for q in quantizers.values()]
        for tensor, q in zip(quantizers, modules):
            q.init_per_channel(torch.cat(samples[tensor.name]), self.init)
        if not ctx.ranks.distributed:
            return
        flat = all_reduce_values([v for q in modules for v in q.step.detach().tolist()], dist.ReduceOp.SUM, ctx.ranks)
        at = 0
        with torch.no_grad():
            for q in modules:
                n = q.step.numel()
                q.step.copy_(torch.tensor(flat[at:at + n], dtype=q.step.dtype) / ctx.ranks.size)
                at += n

    def quantize_tensor(self, gm: fx.GraphModule, tensor: fx.Node, readers: list[fx.Node],
                        channels: int | None = None) -> fx.Node:
        """Put ``tensor`` on a grid for ``readers`` (one step per channel of axis 1 with
        ``channels``, steps then set by :meth:`fit_channel_steps`); returns the quantizer node
        they now read."""
        existing = [u for u in tensor.users if ir.ACT in u.meta]
        wide = [q for q in existing if self.is_wide(q)]
        if wide:
            quantizer = wide[0]
        else:
            rng = ir.get(tensor, ir.RANGE, ir.TensorRange)
            signed, zero_point = init.choose_grid(rng, self.bits, self.asymmetric)
            axis = 1 if channels else None
            q = UniformQuantizer(self.bits, signed=signed, channels=channels, channel_axis=axis or 0, zero_point=zero_point)
            if not channels:  # per-channel steps come from the samples (fit_channel_steps)
                init_act_step(q, rng, self.init)
            name = f"{tensor.name}_join"
            record = ir.ActQuant(role="join", method="lsq", bits=self.bits, signed=q.signed, module=name, init=self.init,
                                 zero_point=zero_point, channel_axis=axis)
            quantizer = insert_quantizer(gm, tensor, name, q, record)
            readers = readers + existing  # narrower quantizers now requantize these codes
        for reader in readers:
            if reader is not quantizer:
                reader.replace_input_with(tensor, quantizer)
        return quantizer
