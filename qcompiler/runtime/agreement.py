"""Agreement of an integer program with the fake-quant module it was lowered from.

"Bit-true" (docs/design.md §1): every requantized code equals the code the
fake-quant module computes when it runs in float64 on the CPU
(``copy.deepcopy(compiled.module).double()``, its weights on their recorded float32
codes), except at exact ties of the module's ``x / step``, which are counted.
:func:`verify_program` runs both on the same inputs and compares every activation
quantizer's codes twice: fed the reference's codes of the quantizers before it (the
per-layer check: one tie decided the other way would otherwise reach every later layer
through the residual stream), and end to end, the program on its own codes throughout, as
deployed (the classes).

Example:
    >>> import qcompiler, torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(64, 4))
    >>> report = c.lower().verify(c, torch.randn(32, 4).numpy())
    >>> report.ok(), report.first_divergent
    (True, None)
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis import class_axis, sole_tensor
from ..nn.layout import channel_weight, from_channel_first, is_transposed
from ..quantizers.adder import QAdderConv2d
from ..quantizers.asq import ASQQuantizer
from .interpreter import Overflow


@dataclass(frozen=True)
class LayerAgreement:
    """One activation quantizer: how many codes the program and the module share."""

    name: str
    count: int
    identical: float  # fraction of codes equal, this quantizer fed the reference's earlier codes
    max_diff: int  # largest code difference, same inputs
    ties: int  # codes where the module's x / step is exactly half-way
    end_to_end: float = 1.0  # fraction equal when the program runs on its own codes throughout
    untied_identical: float = 1.0  # fraction equal among the codes that are not exact ties


@dataclass(frozen=True)
class AgreementReport:
    layers: tuple[LayerAgreement, ...]
    first_divergent: str | None  # the first quantizer with a differing code off the exact ties
    classes_agree: float  # fraction of samples whose arg-max output agrees
    output_max_abs_diff: float
    overflows: tuple[str, ...] = ()  # accumulators past their declared width, end to end (one message per layer)

    def ok(self, identical: float = 0.999, max_diff: int = 1, classes: float = 0.995) -> bool:
        """Every quantizer's codes off exact ties at least ``identical`` equal and none more than
        ``max_diff`` apart, and the classes at least ``classes`` in agreement.

        Exact ties are left out of ``identical``: where one grid's step is a rational
        multiple of the next one's (5/6, say), a sixth of the codes land exactly half-way,
        and the program's fixed-point multiplier, which cannot hold 5/6 exactly, decides
        every one of them the same way where the module rounds half to even. They are
        counted in ``ties`` and differ by one code at most.

        An accumulator past its declared width (:mod:`.isa`) fails too, whatever the codes: the
        hardware the program models would not hold the sum (``program.run`` raises there).
        """
        return (all(la.untied_identical >= identical and la.max_diff <= max_diff for la in self.layers)
                and self.classes_agree >= classes and not self.overflows)

    def text(self) -> str:
        rows = [f"{'quantizer':40s} {'codes':>9s} {'identical':>10s} {'max diff':>8s} {'ties':>5s} {'end to end':>10s}"]
        for la in self.layers:
            rows.append(f"{la.name:40s} {la.count:9d} {la.identical:10.6f} {la.max_diff:8d} {la.ties:5d} {la.end_to_end:10.6f}")
        rows.append(f"classes agree {self.classes_agree:.4f}; output max |diff| {self.output_max_abs_diff:.3g}; "
                    f"first divergent: {self.first_divergent or 'none'}")
        if self.overflows:
            rows.append(f"accumulator overflows in {len(self.overflows)} layer(s); first: {self.overflows[0]}")
        return "\n".join(rows)


@torch.no_grad()
def _weights_on_their_codes(module: torch.nn.Module) -> None:
    """Replace each quantized layer's float weight by its float32 quantized value (codes times steps).

    The reference runs in float64, where a weight's ``w / step`` can round to another code
    than the float32 division that made the recorded codes, which the program and both ONNX
    forms use: ``-0.01412956 / 0.00076376`` is -18.5000006 in float64 but exactly -18.5 in
    float32, a tie that goes to -18 (VGG-11's third convolution has one such weight). A
    weight that already is ``code * step`` quantizes to that code in float64 too. A tensor
    shared by two layers (tied weights) is left as it is: each quantizer would claim it.
    """
    layers = [m for m in module.modules() if isinstance(m, QAdderConv2d) or hasattr(m, "weight_quant")]
    owners = Counter(layer.weight.data_ptr() for layer in layers)
    for layer in layers:
        if owners[layer.weight.data_ptr()] > 1:
            continue
        if isinstance(layer, QAdderConv2d):
            steps = layer.weight_steps().view(-1, *([1] * (layer.weight.dim() - 1)))
            layer.weight.copy_(layer.weight_codes() * steps)
        else:
            values = layer.weight_quant(channel_weight(layer))  # eval: codes times steps
            layer.weight.copy_(from_channel_first(values, layer.groups) if is_transposed(layer) else values)


@torch.no_grad()
def reference_codes(compiled, x: np.ndarray) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The float64 module's output and, per quantizer node, ``(codes, exact-tie mask)``.

    Its weights are the recorded float32 codes (:func:`_weights_on_their_codes`); everything
    after them, accumulation, batch norm and requantization, runs in float64.
    """
    ref = copy.deepcopy(compiled.module).eval()
    _weights_on_their_codes(ref)
    ref = ref.double()
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hooks = []
    for node in ref.graph.nodes:
        if node.op != "call_module" or "qc.act" not in node.meta:
            continue
        q = ref.get_submodule(node.target)

        def hook(m, inputs, _out, name=node.name):
            v = inputs[0]
            step = m.sample_step(v) if isinstance(m, ASQQuantizer) else m.step_view(v)
            u = v / step
            tie = (u - torch.floor(u) == 0.5) & (u > m.qmin) & (u < m.qmax)
            found[name] = (m.codes(v).numpy(), tie.numpy())

        hooks.append(q.register_forward_hook(hook))
    try:
        out = ref(torch.from_numpy(np.asarray(x, dtype=np.float64)))
    finally:
        for h in hooks:
            h.remove()
    return sole_tensor(out).numpy(), found


def verify_program(program, compiled, x: np.ndarray) -> AgreementReport:
    """Run ``program`` and the float64 module on ``x``; compare every quantizer's codes and the classes."""
    compiled.freeze()
    x = np.asarray(x, dtype=np.float32)  # the network input the float32 model would see
    ref_out, ref = reference_codes(compiled, x)
    names = tuple(program.meta["quantizers"])
    # Per layer, each quantizer reads the reference's codes of the quantizers before it:
    # a requantization is checked on the same inputs, and a tie decided the other way
    # (counted) does not spread through the residual stream into every later layer.
    _, forced, _ = program.trace(x, keep=names, on_overflow="record", force={n: ref[n][0] for n in names})
    out, free, overflows = program.trace(x, keep=names, on_overflow="record")  # end to end, as deployed
    layers, first = [], None
    for name in names:
        want, tie = ref[name]
        diff = np.abs(forced[name].astype(np.int64) - want.astype(np.int64))
        end_to_end = float((free[name].astype(np.int64) == want.astype(np.int64)).mean())
        untied = diff[~tie]
        la = LayerAgreement(name, int(diff.size), float((diff == 0).mean()), int(diff.max(initial=0)), int(tie.sum()),
                            end_to_end, float((untied == 0).mean()) if untied.size else 1.0)
        if first is None and np.any(untied != 0):
            first = name
        layers.append(la)
    axis = class_axis(compiled.module)  # a segmentation map's classes are its channels
    classes = float((out.argmax(axis) == ref_out.argmax(axis)).mean())
    worst: dict[str, Overflow] = {}  # per layer, its largest overflow
    for o in overflows:
        if o.layer not in worst or abs(o.value) > abs(worst[o.layer].value):
            worst[o.layer] = o
    return AgreementReport(tuple(layers), first, classes, float(np.abs(out - ref_out).max()),
                           tuple(o.message() for o in worst.values()))


__all__ = ["AgreementReport", "LayerAgreement", "reference_codes", "verify_program"]
