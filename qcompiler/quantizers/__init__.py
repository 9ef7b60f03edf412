"""Quantizer modules: the single source of quantization numerics."""

from .uniform import UniformQuantizer, int_range, lsq_quantize, positive, quantize_codes

__all__ = ["UniformQuantizer", "int_range", "lsq_quantize", "positive", "quantize_codes"]
