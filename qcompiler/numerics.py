"""TEMPORARY: replaced by the numerics module from the wt-numerics branch at merge."""
import torch
POST_MANTISSA = 0xB504F3
POST_SHIFT = 24
def largest_exponent(codes: torch.Tensor) -> int:
    nz = codes[codes != 0]
    return int(nz.abs().max()) - 1 if nz.numel() else -1
