"""Quantization records: the facts passes decide, stored on the torch.fx graph.

The IR *is* the ``torch.fx`` graph. Every decision a pass makes is written as a
small frozen dataclass into ``node.meta`` under a namespaced key, so the IR dumps,
the reports and the backends read the same facts without re-deriving them:

==================  ==============  ==================================================
key                 record          on which nodes
==================  ==============  ==================================================
``qc.layer``        LayerInfo       compute layers (conv, linear, adder)
``qc.pin``          Pin             compute layers held at a fixed bit width
``qc.range``        TensorRange     nodes whose output feeds a quantized layer
``qc.act``          ActQuant        inserted activation-quantizer nodes
``qc.weight``       WeightQuant     compute layers whose weight is quantized
``qc.codes``        WeightCodes     compute layers on a POT/POST grid
``qc.adder_in``     ClampRange      adder layers: calibrated input range (outlier clamp)
``qc.adder_q``      AdderScales     quantized adder layers: scale groups, clamp, constants
==================  ==============  ==================================================

Learned values (steps, clips) live in the quantizer modules the records name, since
QAT keeps changing them; the records hold what is fixed once a pass has run.

Example:
    >>> rec = LayerInfo(kind="linear", in_channels=4, out_channels=2,
    ...                 weight_shape=(2, 4), input_shape=(4,), output_shape=(2,), macs=8)
    >>> rec.params
    8
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.fx as fx

R = TypeVar("R")

LAYER = "qc.layer"
PIN = "qc.pin"
RANGE = "qc.range"
ACT = "qc.act"
WEIGHT = "qc.weight"
CODES = "qc.codes"
ADDER_IN = "qc.adder_in"
ADDER_Q = "qc.adder_q"


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about a compute layer, written by the front end."""

    kind: str  # "conv1d" | "conv2d" | "linear" | "adder2d"
    in_channels: int
    out_channels: int
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    output_shape: tuple[int, ...]
    macs: int  # multiply-accumulates (or abs-diff-accumulates) per sample
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = 1
    has_bias: bool = False

    @property
    def params(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n + (self.out_channels if self.has_bias else 0)


@dataclass(frozen=True)
class Pin:
    """A layer held at ``bits`` for weights and input activations, and why."""

    bits: int
    reason: str


@dataclass(frozen=True)
class TensorRange:
    """Streaming statistics of one tensor over the calibration data."""

    min: float
    max: float
    mean_abs: float
    abs_p999: float  # 99.9th percentile of |x|, from the observer's histogram
    abs_p9999: float
    count: int  # elements seen

    @property
    def signed(self) -> bool:
        return self.min < 0.0


@dataclass(frozen=True)
class ActQuant:
    """An activation quantizer inserted in front of ``layer``."""

    layer: str  # node name of the compute layer this quantizer feeds
    method: str  # "lsq" | "asq" | "adder-group" | "adder-shared"
    bits: int
    signed: bool
    module: str  # qualified name of the quantizer module (holds the learned step)
    init_step: float


@dataclass(frozen=True)
class WeightQuant:
    """How a compute layer's weight is quantized."""

    grid: str  # "uniform" | "pot" | "post" | "adder-group" | "adder-shared"
    bits: int
    granularity: str  # "per-channel" | "per-group" | "per-layer"
    module: str  # qualified name of the weight quantizer module


@dataclass(frozen=True, eq=False)
class WeightCodes:
    """The integer code of every weight on a power grid, for the backends.

    ``codes`` holds ``sign * m`` per weight: ``m = 0`` is zero, otherwise the weight
    is ``scale[c] * sign * base^-(m-1)``; ``exponent = m - 1`` tells a backend the
    shift (``exponent // 2`` for POST) and whether the ``1/sqrt(2)`` table is needed
    (odd exponent, POST only). Refreshed from the quantizer after training.
    """

    grid: str  # "pot" | "post"
    bits: int
    base: float
    codes: torch.Tensor  # int64, the weight's shape
    scale: torch.Tensor  # per output channel (alpha)

    @property
    def sign(self) -> torch.Tensor:
        return torch.sign(self.codes)

    @property
    def exponent(self) -> torch.Tensor:
        """``k = m - 1`` per weight; -1 marks a zero weight."""
        return self.codes.abs() - 1


@dataclass(frozen=True)
class ClampRange:
    """An adder layer's input range: the ``alpha`` quantile of ``|x|``, max over batches."""

    alpha: float
    range: float
    batches: int


@dataclass(frozen=True, eq=False)
class AdderScales:
    """How an adder layer is quantized (AdderNet redistribution, DESIGN.md §3.4).

    Output channel ``c`` belongs to scale group ``group_of_channel[c]``; group ``g``
    quantizes the input with ``act_steps[g] = group_ranges[g] / (2^act_bits - 1)``
    (unsigned codes ``a_q``) and its weights with ``weight_step_ratio * act_steps[g]``
    (narrow signed codes ``w_q`` in ``±(2^(weight_bits-1) - 1)``), so the layer
    computes ``-act_steps[g] * sum |a_q - weight_step_ratio * w_q|``.

    Fields:
        method: ``"redistribution"`` (pass ``adder-groups``) or ``"shared"`` (pass
            ``adder-shared``); the layer's ``WeightQuant.grid`` is ``f"adder-{method}"``.
        act_bits: width of the unsigned activation codes.
        weight_bits: width of the signed weight codes (narrow, symmetric range).
        weight_step_ratio: the integer weight step / activation step,
            ``numerics.adder_weight_step_ratio(act_bits, weight_bits)``.
        input_range: ``r_x``, the calibrated range of the layer's input.
        group_of_channel: scale group of each output channel (need not be contiguous).
        group_ranges: ``r_g`` per group: ``min(max |W_g|, r_x)`` with the weight clamp,
            ``max`` of the two without.
        act_steps: activation step per group, ``r_g / (2^act_bits - 1)``.
        weight_clamped: whether weights were clamped to ``±r_x`` (lossless clamp).
        compensation: the lossless clamp's constant ``-sum max(|W[c]| - r_x, 0)`` per
            output channel, as computed when the pass ran (zeros without the clamp).
        folded_into: where the constant was added: the following batch norm's node
            name, ``"bias"`` (the layer's bias), or ``""`` when it is all zero.
        compensation_applies: whether ``compensation`` is still a term of the function
            the model computes. False when it was folded into a batch norm whose
            running statistics the pass then re-estimated: the new mean absorbs any
            per-channel constant, so adding it again would count it twice. True when
            it sits in the layer's bias (or is zero).
    """

    method: str
    act_bits: int
    weight_bits: int
    weight_step_ratio: int
    input_range: float
    group_of_channel: tuple[int, ...]
    group_ranges: tuple[float, ...]
    act_steps: tuple[float, ...]
    weight_clamped: bool
    compensation: torch.Tensor
    folded_into: str
    compensation_applies: bool


def get(node: fx.Node, key: str, kind: type[R]) -> R:
    """Read the record ``key`` of ``node``; a missing record is a pipeline bug.

    >>> import torch.fx as fx
    >>> g = fx.Graph(); n = g.placeholder("x")
    >>> get(n, PIN, Pin)
    Traceback (most recent call last):
    ...
    KeyError: "node 'x' has no 'qc.pin' record (Pin); a pass that produces it must run first"
    """
    rec = node.meta.get(key)
    if rec is None:
        raise KeyError(
            f"node {node.name!r} has no {key!r} record ({kind.__name__}); "
            "a pass that produces it must run first"
        )
    assert isinstance(rec, kind), f"{key} on {node.name} is {type(rec).__name__}, not {kind.__name__}"
    return rec


def find(node: fx.Node, key: str, kind: type[R]) -> R | None:
    """Like :func:`get` but returns ``None`` when the record is absent."""
    rec = node.meta.get(key)
    assert rec is None or isinstance(rec, kind)
    return rec


def input_act(layer: fx.Node) -> ActQuant | None:
    """The ``ActQuant`` record of the quantizer feeding ``layer``'s input, if any."""
    src = layer.args[0] if layer.args else None
    return src.meta.get(ACT) if isinstance(src, fx.Node) else None


def records(node: fx.Node) -> dict[str, object]:
    """All quantization records of ``node``, by key, in a stable order."""
    return {k: node.meta[k] for k in sorted(node.meta) if k.startswith("qc.")}


def compute_layers(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes carrying a ``qc.layer`` record, in graph order."""
    return [n for n in gm.graph.nodes if LAYER in n.meta]


def format_record(rec: object) -> str:
    """Compact one-line rendering used by IR dumps and reports.

    >>> format_record(Pin(bits=8, reason="reads the network input"))
    "Pin(bits=8, reason='reads the network input')"
    """
    if not dataclasses.is_dataclass(rec):
        return repr(rec)
    parts = []
    for f in dataclasses.fields(rec):
        v = getattr(rec, f.name)
        parts.append(f"{f.name}={_fmt(v)}")
    return f"{type(rec).__name__}({', '.join(parts)})"


def _fmt(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{list(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple) and len(v) > 8:
        head = ", ".join(_fmt(x) for x in v[:4])
        return f"({head}, ... {len(v)} values)"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)
