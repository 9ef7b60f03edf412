"""The integer program's instruction set: one declaration per instruction.

Every instruction is declared once in :data:`ISA`, a table of frozen
:class:`OpDecl` records. The lowering (:mod:`.lower`) emits only declared names,
the interpreter (:mod:`.interpreter`) dispatches ``op_<name>`` and checks results
against ``acc_bits``, and :func:`isa_table` renders the docs table from the same
records, so the four never disagree.

Buffers hold integers (codes, accumulators) except where an operand says
``float``: the network input, the per-sample ASQ steps and the network output,
which are host-side values (``host=True``). Widths are the largest the unit
accepts; each emitted instruction carries its actual operand widths in ``attrs``.

Example:
    >>> ISA["mac"].acc_bits, ISA["mac"].cost
    (32, 'mac')
    >>> Instr("relu", "y", ("x",)).srcs
    ('x',)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# How the cost model (:mod:`.cost`) counts an instruction's work.
COST_KINDS = ("mac", "shift", "sad", "requant", "cmp", "add", "lut", "move", "host")


@dataclass(frozen=True)
class OpDecl:
    """One instruction: its operands, widths, meaning and how the cost model counts it.

    ``operand_bits`` is the widest integer operand the unit reads (0: float host
    values); ``acc_bits`` the width of its accumulator or result register, which the
    interpreter checks every result against (0: no integer result).
    """

    name: str
    operands: str
    operand_bits: int
    acc_bits: int
    semantics: str
    cost: str  # one of COST_KINDS
    host: bool = False


ISA: dict[str, OpDecl] = {
    d.name: d
    for d in (
        OpDecl("quantize", "x: float (N, ...)", 0, 16,
               "y = clamp(round_half_even(x / step), qmin, qmax); step per sample under ASQ", "host", host=True),
        OpDecl("asq_beta", "terms: int (N, C, ...) [, per-sample steps]", 64, 0,
               "s_n = step * exp(L tanh(fc2(relu(fc1(mean_pos(clip(sum_t x_t*scale_t + offset)))))/L))", "host", host=True),
        OpDecl("mac", "x: int codes (N, C, *S); w: const int codes (O, C/g, *K)", 16, 32,
               "acc[n,o,p] = sum_{c,k} x[n, g(o)*C/g + c, p*stride + k*dilation - pad] * w[o,c,k]", "mac"),
        OpDecl("shift_acc", "x: int codes (N, C, *S); sign, shift[, odd]: const per weight; table: const LUT", 16, 48,
               "acc = sum sign * (odd ? LUT[|x|] * sgn(x) : x << post_shift) << shift; LUT[A] = A * 0xB504F3 (POST)",
               "shift"),
        OpDecl("sad", "a_g: unsigned codes per scale group (N, C, *S); w: const int (O, C/g, *K); group: const (O,)", 16, 32,
               "acc[n,o,p] = sum_{c,k} |a_{group[o]}[n, c, p*stride + k*dilation - pad] - w[o,c,k]| (w in activation steps)",
               "sad"),
        OpDecl("requant", "terms x_t: int (N, ...) [, per-sample steps]", 48, 64,
               "y = clamp(shift_round_half_even(sum_t x_t * m_t[c] + b[c], sh[c]), lo, hi); m_t: 31-bit", "requant"),
        OpDecl("maxpool", "x: int (N, C, *S)", 64, 64,
               "y = max over each window (padding never wins)", "cmp"),
        OpDecl("sumpool", "x: int (N, C, *S)", 64, 64,
               "y = sum over each window, zero padding (adaptive: windows [floor(i*S/O), ceil((i+1)*S/O))); "
               "the divisor goes into the next requant", "add"),
        OpDecl("relu", "x: int (N, ...)", 64, 64, "y = max(x, 0)", "cmp"),
        OpDecl("mul", "a, b: int codes (N, ...), broadcast against each other", 16, 32,
               "y = a * b elementwise, broadcast as torch broadcasts: a product of two activations (a gate)", "mac"),
        OpDecl("lookup", "x: int codes (N, ...); table: const int (qmax - qmin + 1,)", 16, 32,
               "y = table[x - qmin]: an elementwise function (hardswish, SiLU, sigmoid, GELU, ...) at every code, "
               "in units of 2^-frac_bits", "lut"),
        OpDecl("concat", "xs: int (N, ...)", 64, 64, "y = concatenate(xs, axis)", "move"),
        OpDecl("reshape", "x: int (N, ...), or the float input before its quantize", 64, 64, "y = x.reshape(N, *shape) (no data movement)", "move"),
        OpDecl("permute", "x: int (N, ...), or the float input before its quantize", 64, 64, "y = x.transpose(0, *perm) (perm over the non-batch axes, 1-based)",
               "move"),
        OpDecl("index", "x: int (N, ...), or the float input before its quantize", 64, 64,
               "y = x[:, *index] (per non-batch axis: [start, stop, step], an integer, which drops the axis, or "
               "{positions}, a gather along it, position -1 a zero: nearest upsampling, padding)", "move"),
        OpDecl("dequant", "terms x_t: int (N, ...) [, per-sample steps]", 64, 0,
               "y = clip(sum_t x_t * scale_t + offset, lo, hi) as float64 (the network output)", "host", host=True),
        OpDecl("activation", "x: float64 (N, ...), the dequantized output", 0, 0,
               "y = f(x) in float64, f one of softmax or log_softmax over an axis, sigmoid, tanh: the function a "
               "network ends in, run on the host after dequant", "host", host=True),
    )
}


@dataclass(frozen=True)
class Instr:
    """One emitted instruction: ``dst = op(srcs; consts; attrs)``.

    ``srcs`` lists every buffer it reads (the interpreter frees a buffer after its
    last reader), ``consts`` the constant tables it reads, ``attrs`` JSON values,
    and ``layer`` the graph node it came from (named in overflow reports).
    """

    op: str
    dst: str
    srcs: tuple[str, ...] = ()
    consts: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    layer: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "dst": self.dst, "srcs": list(self.srcs), "consts": list(self.consts),
                "attrs": self.attrs, "layer": self.layer}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Instr:
        return cls(d["op"], d["dst"], tuple(d["srcs"]), tuple(d["consts"]), dict(d["attrs"]), d["layer"])


def isa_table() -> str:
    """The instruction set as a Markdown table (docs/runtime.md embeds it).

    >>> isa_table().splitlines()[0]
    '| instruction | operands | operand bits | acc bits | semantics | cost | host |'
    """
    rows = ["| instruction | operands | operand bits | acc bits | semantics | cost | host |", "|---|---|---|---|---|---|---|"]
    for d in ISA.values():
        rows.append(f"| `{d.name}` | {d.operands} | {d.operand_bits or '-'} | {d.acc_bits or '-'} | "
                    f"`{d.semantics}` | {d.cost} | {'yes' if d.host else ''} |")
    return "\n".join(rows)


__all__ = ["COST_KINDS", "ISA", "Instr", "OpDecl", "isa_table"]
