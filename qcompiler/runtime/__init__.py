"""The integer backend: lower a compiled model to a shift/LUT/MAC/SAD program and run it bit-true.

* :mod:`.isa`: the instruction set, one declaration per instruction;
* :mod:`.program`: :class:`Program` and its ``.npz`` + JSON file format;
* :mod:`.lower`: compiled graph to program (reads only frozen records);
* :mod:`.interpreter`: the NumPy interpreter (exact integers, overflow checks);
* :mod:`.agreement`: per-layer agreement with the float64 fake-quant module.

Example: ``program = compiled.lower(); y = program.run(x); program.verify(compiled, x)``.
"""

from .agreement import AgreementReport, LayerAgreement
from .interpreter import AccumulatorOverflow, Interpreter
from .isa import ISA, Instr, OpDecl
from .lower import lower
from .program import Program, ProgramFileError

__all__ = ["ISA", "AccumulatorOverflow", "AgreementReport", "Instr", "Interpreter", "LayerAgreement", "OpDecl",
           "Program", "ProgramFileError", "lower"]
