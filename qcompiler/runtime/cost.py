"""Operation, memory-traffic and energy counts of an integer program, next to float32.

Counts are per sample and come from the program itself: each instruction's kind,
its declared widths (:mod:`.isa`) and the buffer shapes of one run. Energy uses the
45 nm figures of Horowitz (ISSCC 2014), :data:`ENERGY_PJ`. An integer operation of
at most 8 bits costs the 8-bit figure, a wider one the 32-bit figure, and an add
wider than 32 bits (48/64-bit accumulators) scales linearly with its width. A shift
counts as an add of the accumulator's width, a comparison as an add. A table look-up
(``lookup``) counts as one 64-bit read of the smallest SRAM the figures list (8 KB,
10 pJ), which holds the 32-bit table of an input up to 11 bits: an upper bound for the
256 words of an 8-bit input. The float32
baseline is the same model as a multiply network: one float multiply and one float
add per multiply-accumulate (also for adder and power-grid layers), one of each per
output element and per term for the batch-norm/requantization epilogue, and every
tensor and weight stored as 32 bits. Elementwise functions (a table in the program, the
host's output activation) count as one float multiply and add per element there, the
figures having no exponential.

Example:
    >>> ENERGY_PJ[("mult", 8)], ENERGY_PJ[("fmult", 32)]
    (0.2, 3.7)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .isa import ISA
from .program import Program

ENERGY_PJ: dict[tuple[str, int], float] = {
    ("add", 8): 0.03, ("add", 32): 0.1, ("mult", 8): 0.2, ("mult", 32): 3.1,
    ("fadd", 32): 0.9, ("fmult", 32): 3.7, ("sram8k_read", 64): 10.0,
}


def energy(op: str, bits: int) -> float:
    """Energy in pJ of one ``op`` (``add``/``mult``/``fadd``/``fmult``) at ``bits``."""
    if op in ("fadd", "fmult"):
        return ENERGY_PJ[(op, 32)]
    if bits <= 8:
        return ENERGY_PJ[(op, 8)]
    base = ENERGY_PJ[(op, 32)]
    return base * bits / 32 if op == "add" and bits > 32 else base


@dataclass(frozen=True)
class LayerCost:
    """One graph node's instructions: operation counts by kind and width, traffic, energy."""

    layer: str
    counts: dict[str, int]  # e.g. {"mult8": 1152, "add32": 1152}
    traffic_bits: int
    energy_pj: float
    float_energy_pj: float
    float_traffic_bits: int


@dataclass(frozen=True)
class CostReport:
    layers: tuple[LayerCost, ...]

    @property
    def energy_pj(self) -> float:
        return sum(lc.energy_pj for lc in self.layers)

    @property
    def float_energy_pj(self) -> float:
        return sum(lc.float_energy_pj for lc in self.layers)

    @property
    def counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for lc in self.layers:
            total.update(lc.counts)
        return dict(sorted(total.items()))

    def text(self) -> str:
        rows = [f"{'layer':32s} {'energy pJ':>12s} {'float32 pJ':>12s} {'traffic bits':>13s}  counts"]
        for lc in self.layers:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(lc.counts.items()))
            rows.append(f"{lc.layer:32s} {lc.energy_pj:12.1f} {lc.float_energy_pj:12.1f} {lc.traffic_bits:13d}  {counts}")
        traffic = sum(lc.traffic_bits for lc in self.layers)
        float_traffic = sum(lc.float_traffic_bits for lc in self.layers)
        rows.append(f"{'total':32s} {self.energy_pj:12.1f} {self.float_energy_pj:12.1f} {traffic:13d}  "
                    f"(float32: {float_traffic} bits; energy ratio {self.float_energy_pj / max(self.energy_pj, 1e-12):.1f}x)")
        return "\n".join(rows)


def _width(bits: int) -> int:
    return 8 if bits <= 8 else 32


def costs(program: Program, x: np.ndarray) -> CostReport:
    """Per-sample costs of ``program``, shapes taken from a run on the first sample of ``x``."""
    from .interpreter import Interpreter

    it = Interpreter(program, on_overflow="record")
    it.run(np.asarray(x)[:1])
    size = {k: int(np.prod(v)) for k, v in it.shapes.items()}
    size[program.inputs[0]] = int(np.prod(np.asarray(x).shape[1:]))
    bits_of: dict[str, int] = {program.inputs[0]: 32}
    per_layer: dict[str, dict] = {}
    for ins in program.instructions:
        a, decl = ins.attrs, ISA[ins.op]
        n = size[ins.dst]
        c: Counter[str] = Counter()
        e = fe = 0.0
        out_bits = decl.acc_bits or 32
        if ins.op in ("mac", "shift_acc", "sad"):
            # a transposed conv's products with the zeros spread between its inputs are not work
            # its hardware does: its own count of multiply-accumulates per sample
            macs = a.get("macs", n * a["k"])
            op_bits = max(a["a_bits"], a["w_bits"])
            if ins.op == "mac":
                c[f"mult{_width(op_bits)}"] += macs
                e += macs * energy("mult", op_bits)
            elif ins.op == "shift_acc":
                c[f"shift{decl.acc_bits}"] += macs
                e += macs * energy("add", decl.acc_bits)
            else:
                c[f"sub{_width(op_bits + 1)}"] += macs
                e += macs * energy("add", op_bits + 1)
            c[f"add{decl.acc_bits}"] += macs
            e += macs * energy("add", decl.acc_bits)
            fe += macs * (energy("fmult", 32) + energy("fadd", 32))
            w = program.consts[ins.consts[0]]
            weight_bits = w.size * a["w_bits"]
        elif ins.op == "requant":
            terms = len(a["terms"])
            c["mult32"] += n * terms
            c["add64"] += n * terms
            e += n * terms * (energy("mult", 32) + energy("add", 64))
            fe += n * terms * (energy("fmult", 32) + energy("fadd", 32))
            out_bits = int(np.ceil(np.log2(a["qmax"] - a["qmin"] + 1)))
            weight_bits = 0
        elif ins.op in ("maxpool", "sumpool", "relu"):
            window = int(np.prod(a.get("kernel", [1])))
            c[f"{'add' if ins.op == 'sumpool' else 'cmp'}32"] += n * window
            e += n * window * energy("add", 32)
            fe += n * window * energy("fadd", 32)
            out_bits = bits_of.get(ins.srcs[0], 32) if ins.op != "sumpool" else 32
            weight_bits = 0
        elif ins.op == "mul":  # a product of two activations: one multiply per element
            op_bits = max(a["a_bits"], a["b_bits"])
            c[f"mult{_width(op_bits)}"] += n
            e += n * energy("mult", op_bits)
            fe += n * energy("fmult", 32)
            weight_bits = 0
        elif ins.op == "lookup":
            c["lut"] += n
            e += n * ENERGY_PJ[("sram8k_read", 64)]
            fe += n * (energy("fmult", 32) + energy("fadd", 32))
            weight_bits = 0
        elif ins.op == "quantize":
            c["host_fmult"] += n
            fe_q = n * energy("fmult", 32)
            e += fe_q
            out_bits = int(np.ceil(np.log2(a["qmax"] - a["qmin"] + 1)))
            weight_bits = 0
        elif ins.op == "activation":  # an exponential (or tanh) per element, and softmax's sum and division;
            # the energy table has no exponential: each element counts as one float multiply-add
            c["host_fexp"] += n
            c["host_fadd"] += n
            c["host_fmult"] += n
            e += n * (energy("fmult", 32) + energy("fadd", 32))
            fe += n * (energy("fmult", 32) + energy("fadd", 32))
            weight_bits = 0
        elif ins.op in ("asq_beta", "dequant"):
            ops = sum(program.consts[name].size for name in ins.consts[:4]) if ins.op == "asq_beta" else n * len(a["terms"])
            c["host_fmult"] += ops
            c["host_fadd"] += ops
            e += ops * (energy("fmult", 32) + energy("fadd", 32))
            fe += ops * (energy("fmult", 32) + energy("fadd", 32)) if ins.op == "dequant" else 0.0
            weight_bits = 0
        else:  # concat, reshape: data movement only
            out_bits = bits_of.get(ins.srcs[0], 32) if ins.srcs else 32
            weight_bits = 0
        bits_of[ins.dst] = out_bits
        reads = sum(size.get(s, 0) * bits_of.get(s, 32) for s in ins.srcs) if ins.op not in ("reshape",) else 0
        writes = n * out_bits if ins.op not in ("reshape",) else 0
        float_traffic = (sum(size.get(s, 0) for s in ins.srcs) + n) * 32 if ins.op not in ("reshape",) else 0
        if weight_bits:
            float_traffic += program.consts[ins.consts[0]].size * 32
        row = per_layer.setdefault(ins.layer or ins.dst, {"counts": Counter(), "traffic": 0, "e": 0.0, "fe": 0.0, "ft": 0})
        row["counts"].update(c)
        row["traffic"] += reads + writes + weight_bits
        row["e"] += e
        row["fe"] += fe
        row["ft"] += float_traffic
    return CostReport(tuple(LayerCost(name, dict(r["counts"]), r["traffic"], r["e"], r["fe"], r["ft"])
                            for name, r in per_layer.items()))


__all__ = ["ENERGY_PJ", "CostReport", "LayerCost", "costs", "energy"]
