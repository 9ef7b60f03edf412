"""Backends: the ONNX emitter and the integer lowering with its interpreter.

Backends read only the final annotated graph of a :class:`qcompiler.Compiled`
(``qc.layer``, ``qc.act``, ``qc.weight``, ``qc.codes``, ``qc.adder_q`` records and the
quantizer modules they name); they never re-derive what a pass decided. The
emitters themselves arrive with the backend issues that follow the foundation.
"""
