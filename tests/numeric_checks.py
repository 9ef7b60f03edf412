"""Numeric checks shared by tests (imported as a top-level module, like small_models)."""

import torch


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``y`` against ``ref``."""
    return float((y - ref).norm() / ref.norm())
