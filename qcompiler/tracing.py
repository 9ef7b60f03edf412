"""Whether a graph is being captured (jit trace, ONNX export, ``torch.compile``).

The training-only machinery (fused kernels, backward recomputation) stays out of graph
capture, which needs the plain eager ops. It asks on every quantizer call of every QAT
step, so the question must be cheap: ``torch.onnx.is_in_onnx_export()`` imports two
modules per call (~2 us, ~200 calls per ResNet-18 step); this reads the same two flags
through references taken once.

Example:
    >>> capturing()
    False
"""

from __future__ import annotations

import torch

try:  # torch 2.13's locations of what torch.onnx.is_in_onnx_export() reads
    from torch.onnx._internal.exporter import _flags as _dynamo_export
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _script_export

    def _in_onnx_export() -> bool:
        return _script_export.in_onnx_export or _dynamo_export._is_onnx_exporting
except ImportError:  # another torch: its public (slower) question
    _in_onnx_export = torch.onnx.is_in_onnx_export


def capturing() -> bool:
    """True while jit tracing, ONNX export or ``torch.compile`` captures the graph."""
    return torch.jit.is_tracing() or _in_onnx_export() or torch.compiler.is_compiling()


__all__ = ["capturing"]
