"""qcompiler: compile a float PyTorch model into a low-bit model through graph passes.

Example:
    >>> import qcompiler
    >>> from qcompiler.data import load_digits
    >>> from qcompiler.zoo import resnet20
    >>> spec = qcompiler.QuantSpec(passes="lsq", weight_bits=4, act_bits=4)
    >>> compiled = qcompiler.compile(resnet20(in_channels=1), spec, calib_data=load_digits())
    >>> print(compiled.report.layer_table())  # doctest: +ELLIPSIS
    layer ...
"""

from .api import Compiled, compile
from .errors import QCompileError
from .spec import LayerOverride, QuantSpec

__all__ = ["compile", "Compiled", "QuantSpec", "LayerOverride", "QCompileError"]
__version__ = "0.1.0"
