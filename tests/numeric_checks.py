"""Numeric checks shared by tests (imported as a top-level module, like small_models)."""

import torch


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``y`` against ``ref``."""
    return float((y - ref).norm() / ref.norm())


def assert_backends_agree(compiled, x: torch.Tensor, fmt: str, outputs_to: float | None = 1e-4) -> None:
    """The integer program (``fmt == "program"``) or an ONNX form (``"custom"``, ``"qdq"``) computes
    what the compiled module computes on ``x``: codes and classes, and ONNX outputs to
    ``outputs_to`` of their range (``None``: classes only, for a QDQ file onnxruntime fuses)."""
    from qcompiler.runtime.onnx_export import onnx_parity, to_onnx

    if fmt == "program":
        report = compiled.lower().verify(compiled, x.numpy())
        assert report.ok(identical=0.999, max_diff=1, classes=0.995), report.text()
        return
    compiled.freeze()
    parity = onnx_parity(compiled, to_onnx(compiled.module, fmt), x)
    assert parity.classes_agree == 1.0, parity.text()
    if outputs_to is not None:
        assert parity.max_abs_diff <= outputs_to * max(parity.output_range, 1e-6), parity.text()
