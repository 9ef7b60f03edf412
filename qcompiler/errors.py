"""User-facing errors.

Every problem caused by user input (a bad spec, a missing file, an untraceable
model) is raised as a ``QCompileError`` subclass whose message names the problem
and the fix in one line. The CLI prints ``qcompile: error: <message>`` and exits
with status 2; ``assert`` is reserved for our own invariants.
"""

from __future__ import annotations


class QCompileError(Exception):
    """Base class of all errors caused by user input."""


class SpecError(QCompileError):
    """The quantization spec or pipeline string is invalid."""


class PipelineError(SpecError):
    """Unknown pass, conflicting passes or a missing prerequisite."""


class TraceError(QCompileError):
    """The model cannot be traced by torch.fx."""


class ModelLoadError(QCompileError):
    """The model file cannot be loaded (missing, wrong kind, unsafe pickle)."""


class DataError(QCompileError):
    """The data set or example inputs are unusable."""


class UnsupportedError(QCompileError):
    """The model uses a layer option the compiler cannot quantize faithfully."""


class PassError(QCompileError):
    """A pass failed; the message names the pass and the passes before it."""
