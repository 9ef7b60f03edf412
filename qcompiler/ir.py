"""Quantization records: the facts passes decide, stored on the torch.fx graph.

The IR *is* the ``torch.fx`` graph. Every decision a pass makes is written as a
small frozen dataclass into ``node.meta`` under a namespaced key, so the IR dumps,
the reports and the backends read the same facts without re-deriving them:

==================  ==============  ==================================================
key                 record          on which nodes
==================  ==============  ==================================================
``qc.layer``        LayerInfo       compute layers (conv, transposed conv, linear, embedding, adder)
``qc.pin``          Pin             compute layers held at a fixed bit width
``qc.range``        TensorRange     nodes whose output a quantizer reads
``qc.act``          ActQuant        inserted activation-quantizer nodes
``qc.join``         Join            residual adds and concats: the grid of each side
``qc.matmul``       MatMul          products of two activations (q @ k^T): each operand's grid
``qc.lookup``       Lookup          elementwise functions (hardswish, SiLU, ...) read on a grid: a table
``qc.weight``       WeightQuant     compute layers whose weight is quantized
``qc.adder_in``     ClampRange      adder layers: calibrated input range (outlier clamp)
``qc.adder_q``      AdderScales     quantized adder layers: scale groups, clamp, constants
``qc.float``        FloatRegion     nodes computed in float, with the reason
``qc.step``         FrozenAct       activation quantizers: effective step, codes, adapter
``qc.codes``        WeightCodes     quantized layers: integer weight codes, every grid
==================  ==============  ==================================================

Learned values (steps, clips, weights) live in the modules the records name, since
QAT keeps changing them. The ``freeze`` analysis (:mod:`qcompiler.passes.freeze`)
writes their current effective values into ``qc.step`` and ``qc.codes``; saving,
reporting and every backend run it first, so nothing reads a stale value.

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

import numpy as np
import torch
import torch.fx as fx

R = TypeVar("R")

LAYER = "qc.layer"
PIN = "qc.pin"
RANGE = "qc.range"
ACT = "qc.act"
WEIGHT = "qc.weight"
CODES = "qc.codes"
JOIN = "qc.join"
MATMUL = "qc.matmul"
LOOKUP = "qc.lookup"
FLOAT = "qc.float"
STEP = "qc.step"
ADDER_IN = "qc.adder_in"
ADDER_Q = "qc.adder_q"
BIAS = "qc.bias"
SMOOTH = "qc.smooth"
REFINE = "qc.refine"


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about a compute layer, written by the front end."""

    kind: str  # "conv1d" | "conv2d" | "conv3d" | "conv_transpose1d" | "conv_transpose2d" | "conv_transpose3d" | "linear" | "adder2d"
    in_channels: int
    out_channels: int
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    output_shape: tuple[int, ...]
    macs: int  # multiply-accumulates (or abs-diff-accumulates) per sample
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()  # zero padding (before, after) per spatial dim, 'same'/'valid' resolved; transposed: cropped
    groups: int = 1
    has_bias: bool = False
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    output_padding: tuple[int, ...] = ()  # transposed convs: extra output rows/columns after the last

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
class AbsHistogram:
    """Counts of ``|x|`` in ``bins`` equal bins over ``[0, edge)``, the values at or
    above zero and those below zero counted apart (what the initial-step search reads)."""

    edge: float
    positive: tuple[float, ...]
    negative: tuple[float, ...]

    @property
    def bins(self) -> int:
        return len(self.positive)


@dataclass(frozen=True)
class TensorRange:
    """Streaming statistics of one tensor over the calibration data.

    ``hist`` is the observer's histogram; it is left out of IR dumps (thousands of
    counts) and is ``None`` in records made before it was kept.
    """

    min: float
    max: float
    mean_abs: float
    abs_p999: float  # 99.9th percentile of |x|, from the observer's histogram
    abs_p9999: float
    count: int  # elements seen
    hist: AbsHistogram | None = dataclasses.field(default=None, repr=False)

    @property
    def signed(self) -> bool:
        """Whether calibration saw any negative value (the quantizers' grid is chosen
        by error instead, :func:`qcompiler.quantizers.init.choose_signed`)."""
        return self.min < 0.0


@dataclass(frozen=True)
class ActQuant:
    """An activation-quantizer node: every integer operation reading its output
    (quantized layers, joins) sees the same codes and the same step.

    ``role`` says why it is there: ``"input"`` when it was placed for the quantized
    layers reading it, ``"join"`` when it puts a residual add's or concat's input or
    output on the residual stream's grid. ``signed`` is the grid chosen by
    :func:`qcompiler.quantizers.init.choose_signed` (the lower expected error on the
    calibration histogram). ``init`` names how its step started
    (:data:`qcompiler.quantizers.init.INITS`): ``"mse"`` (the clip with the least
    expected squared error), ``"percentile"`` (the 99.99th percentile of ``|x|``),
    ``"lsq"`` (``2 mean|x| / sqrt(p)``, LSQ's QAT start) or ``"max"`` (``max|x| / p``,
    no clipping). ``learned`` is False for a uniform step on the network input that
    calibration set (any init but ``"lsq"``): QAT holds it, since learning it would make
    every step compute the first layer's input gradient, a full backward convolution
    that the float model never runs, for a step the data's fixed range already sets.
    ``zero_point`` is set for an asymmetric grid (``QuantSpec.asymmetric_acts``): codes
    ``[-zero_point, 2^bits - 1 - zero_point]``, stored by hardware as unsigned
    ``code + zero_point`` (:func:`qcompiler.quantizers.init.choose_grid`).
    ``channel_axis`` is set where the quantizer has one step per channel along that axis
    (``QuantSpec.per_channel_joins``: a batch norm's output read only by a residual add);
    the code range stays one for the tensor.
    """

    role: str  # "input" | "join"
    method: str  # "lsq" | "asq"
    bits: int
    signed: bool
    module: str  # qualified name of the quantizer module (holds the learned step)
    init: str  # "mse" | "percentile" | "lsq" | "max"
    learned: bool = True  # QAT trains the step (False: held at its calibrated value)
    zero_point: int | None = dataclasses.field(default=None, metadata={"shown_unless": None})
    channel_axis: int | None = dataclasses.field(default=None, metadata={"shown_unless": None})

    @property
    def grid_kind(self) -> str:
        """The grid as reports name it (:func:`grid_kind`)."""
        return grid_kind(self.signed, self.zero_point)


def grid_kind(signed: bool, zero_point: int | None) -> str:
    """``"signed"``, ``"unsigned"`` or ``"asymmetric (zero point z)"``.

    >>> grid_kind(True, None), grid_kind(True, 16)
    ('signed', 'asymmetric (zero point 16)')
    """
    if zero_point is not None:
        return f"asymmetric (zero point {zero_point})"
    return "signed" if signed else "unsigned"


@dataclass(frozen=True)
class Join:
    """A residual add or a concat, as integer hardware runs it.

    Each input is read on the grid of the quantizer node named in ``inputs`` (the
    same order as the operands); the result is requantized by ``output`` onto the
    residual stream's grid (``bits`` wide). A backend rescales each side to the
    output step.
    """

    kind: str  # "add" | "sub" | "cat"
    inputs: tuple[str, ...]
    output: str
    bits: int


@dataclass(frozen=True)
class MatMul:
    """A product of two activations (``q @ k.transpose(-2, -1)``, ``attn @ v``, ``torch.bmm``).

    Both operands are read on the grids of the quantizer nodes named in ``inputs``
    (``bits`` wide), so the product is an integer matmul of two code tensors times
    the two steps; the next quantizer requantizes it. ``elementwise``: a ``*`` of two
    activations instead (a squeeze-excitation gate, ``x * sigmoid(x)``), written by
    ``lookup-activations``: one integer multiply per element.
    """

    inputs: tuple[str, str]
    bits: int
    elementwise: bool = dataclasses.field(default=False, metadata={"shown_unless": False})


@dataclass(frozen=True)
class Lookup:
    """An elementwise function of one activation (hardswish, SiLU, sigmoid, GELU, ...) read on a grid.

    Its input is the codes of the quantizer node named ``input`` (``bits`` wide, one
    step per tensor), so the function takes at most ``2^bits`` values: the integer
    program looks each code up in a table of the function's values, as a hardware
    look-up table would. ``function`` names it as a user would (``module Hardswish``).
    """

    input: str
    bits: int
    function: str


@dataclass(frozen=True)
class WeightQuant:
    """How a compute layer's weight is quantized.

    ``init`` names how the weight steps (uniform) or clips ``alpha`` (pot / post)
    started, as :class:`ActQuant`'s; adder grids take their scales from the group
    ranges (``"range"``). Records saved before it existed read ``"lsq"``.
    """

    grid: str  # "uniform" | "pot" | "post" | "adder-redistribution" | "adder-shared"
    bits: int
    granularity: str  # "per-channel" | "per-row" (embedding) | "per-group" | "per-layer"
    module: str  # qualified name of the module holding the weight quantizer (or the adder layer)
    init: str = "lsq"  # "mse" | "percentile" | "lsq" | "max" | "range"


@dataclass(frozen=True)
class BiasCorrection:
    """The shift the ``bias-correction`` pass added to a quantized layer's output, per channel.

    ``target`` is where it went: ``"bias"`` (the layer's own) or ``"batch-norm"`` (the running
    mean of the batch norm ``batch_norm`` that alone reads the layer); ``rms`` is the shift's
    root mean square over the channels, in the layer's output units.
    """

    target: str  # "bias" | "batch-norm"
    rms: float
    batch_norm: str = ""  # the batch norm's node name when target is "batch-norm"


@dataclass(frozen=True)
class FloatRegion:
    """A node the compiled model computes in float, and why (reported, never silent)."""

    reason: str


@dataclass(frozen=True, eq=False)
class FrozenAdapter:
    """An ASQ adapter's weights: ``beta = exp(L tanh(z / L))`` with
    ``z = fc2(relu(fc1(mean over positions of x)))`` and ``L = beta_bound``.

    ``feature_axis`` is where the features are: 1 for ``(N, C, ...)`` maps (the mean
    runs over space), -1 for ``(N, ..., C)`` tokens (the mean runs over the tokens).
    """

    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    beta_bound: float
    feature_axis: int = 1

    def pools_channels_first(self, node: fx.Node) -> bool:
        """Whether a mean over the positions of ``(N, C, ...)`` maps is this adapter's pooling of
        ``node``'s output: features on axis 1, or a 2-D ``(N, C)`` input, which has no positions
        and so one pooling on either axis. Unknown rank (no shape recorded): only for axis 1."""
        meta = node.meta.get("tensor_meta")
        return self.feature_axis == 1 or (meta is not None and len(meta.shape) == 2)


@dataclass(frozen=True, eq=False)
class FrozenAct:
    """An activation quantizer's effective values: ``codes = clamp(round(x / step), qmin, qmax)``.

    ``step`` is the learned step after ``positive()``; with an ``adapter`` (ASQ) each
    sample's step is ``step * beta(sample)``. With a ``channel_axis`` (per-channel join
    operands, ``ActQuant.channel_axis``) ``step`` holds one value per channel along that
    axis of the ``(N, C, ...)`` tensor; only joins read such a grid (the verifier checks).
    """

    bits: int
    signed: bool
    qmin: int
    qmax: int
    step: float | tuple[float, ...]
    rounding: str  # "half-to-even"
    adapter: FrozenAdapter | None = None
    channel_axis: int | None = dataclasses.field(default=None, metadata={"shown_unless": None})

    def sample_steps(self, rank: int) -> np.ndarray:
        """The step(s) as float64, shaped to broadcast over a batch of rank ``rank``:
        ``(1, C, 1, ...)`` per channel, a 0-d array otherwise.

        >>> FrozenAct(8, False, 0, 255, (0.5, 0.25), "half-to-even", channel_axis=1).sample_steps(4).shape
        (1, 2, 1, 1)
        """
        steps = np.asarray(self.step, dtype=np.float64)
        if self.channel_axis is None:
            return steps
        shape = [1] * rank
        shape[self.channel_axis] = -1
        return steps.reshape(shape)


@dataclass(frozen=True, eq=False)
class WeightCodes:
    """The integer code of every weight of a quantized layer, on any grid.

    ``uniform``: weight ``= codes * scale[c]``. ``adder-*``: weight ``= codes * scale[c]``
    too, with ``scale[c]`` the weight step of the channel's scale group. ``pot`` /
    ``post``: ``codes`` holds ``sign * m``; ``m = 0`` is zero, otherwise the weight is
    ``scale[c] * sign * base^-(m-1)`` (``scale`` is alpha); the exponent ``k = m - 1``
    is a right shift by ``k // 2`` for POST plus, for odd ``k``, one multiply by
    ``post_mantissa * 2^-post_shift`` (float32's ``1/sqrt 2``, exactly).
    ``max_exponent`` is the largest ``k`` actually used (-1 for other grids); the
    accumulator needs about that many extra bits.
    """

    grid: str
    bits: int
    qmin: int
    qmax: int
    codes: torch.Tensor  # the weight's shape; int8 up to 8 bits, int16 up to 16 (numerics.code_dtype)
    scale: torch.Tensor  # float32, per output channel
    bias: torch.Tensor | None  # the layer's float bias, if any
    base: float = 0.0  # power grids: 2 or sqrt 2
    max_exponent: int = -1
    post_mantissa: int = 0
    post_shift: int = 0

    @property
    def sign(self) -> torch.Tensor:
        return torch.sign(self.codes)

    @property
    def exponent(self) -> torch.Tensor:
        """Power grids: ``k = m - 1`` per weight; -1 marks a zero weight."""
        return self.codes.abs() - 1


@dataclass(frozen=True)
class Smoothing:
    """What the ``smooth`` pass moved from a layer norm's output into the linear layers reading it.

    Feature ``c`` of the norm's output was divided by ``s_c = max|x_c|^alpha /
    max|W[:, c]|^(1 - alpha)`` (its affine weight and bias, so the float model is unchanged)
    and column ``c`` of every reader's weight multiplied by it: the activation's outlier
    features shrink towards the others and one per-tensor step fits them better. ``readers``
    are the linear layers' node names; ``spread`` is ``max s / min s``.
    """

    alpha: float
    readers: tuple[str, ...]
    spread: float
    batches: int


@dataclass(frozen=True)
class StepRefinement:
    """What the ``refine-steps`` pass did to an activation quantizer's step.

    ``factor`` multiplied the step (1.0: left as it was); ``layer_error`` is the squared
    error of the layers reading the quantizer at the new step over the old one, and
    ``output_error`` the same ratio for the network's output on the calibration batches,
    which the change had to lower to be kept.
    """

    factor: float
    layer_error: float
    output_error: float


@dataclass(frozen=True)
class ClampRange:
    """An adder layer's input range: the ``alpha`` quantile of ``|x|``, max over batches."""

    alpha: float
    range: float
    batches: int


@dataclass(frozen=True, eq=False)
class AdderScales:
    """How an adder layer is quantized (AdderNet redistribution, docs/design.md §4.5).

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


def act_quantizers(gm: fx.GraphModule) -> list[fx.Node]:
    """The activation-quantizer nodes (``qc.act``), in graph order."""
    return [n for n in gm.graph.nodes if ACT in n.meta]


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
        if not f.repr:  # bulk data (a histogram) that a one-line listing cannot show
            continue
        v = getattr(rec, f.name)
        if "shown_unless" in f.metadata and v == f.metadata["shown_unless"]:
            continue  # an optional fact most records lack (listings stay as they were)
        parts.append(f"{f.name}={_fmt(v)}")
    return f"{type(rec).__name__}({', '.join(parts)})"


def _fmt(v: object) -> str:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return format_record(v)
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
