"""Quantizer modules: fake quantization and its gradients on the numerics of :mod:`qcompiler.numerics`."""

from ..numerics import int_range, quantize_codes
from .uniform import UniformQuantizer, lsq_quantize, positive

__all__ = ["UniformQuantizer", "int_range", "lsq_quantize", "positive", "quantize_codes"]
