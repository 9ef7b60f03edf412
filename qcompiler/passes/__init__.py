"""The pass registry and the named pipelines.

Passes are listed here explicitly (no registration by import side effect), so this
file is the one place that says which passes exist.
"""

from __future__ import annotations

from .base import Pass, PassContext, PassResult
from .asq import ASQ
from .lsq import LSQ
from .manager import PassManager, PassRun, plan
from .observe import Observe
from .pin_first_last import PinFirstLast
from .post import POST
from .pot import POT

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        PinFirstLast,
        Observe,
        LSQ,
        ASQ,
        POT,
        POST,
    )
}

__all__ = ["REGISTRY", "Pass", "PassContext", "PassResult", "PassManager", "PassRun", "plan"]
