"""The pass registry and the named pipelines.

Passes are listed here explicitly (no registration by import side effect), so this
file is the one place that says which passes exist.
"""

from __future__ import annotations

from .base import Pass, PassContext, PassResult
from .adder_groups import AdderGroups
from .adder_shared import AdderShared
from .asq import ASQ
from .bias_correction import BiasCorrection
from .freeze import Freeze
from .lookup_activations import LookupActivations
from .lsq import LSQ
from .manager import PassManager, PassRun, plan
from .observe import Observe
from .outlier_clamp import OutlierClamp
from .pin_first_last import PinFirstLast
from .post import POST
from .pot import POT
from .quantize_joins import QuantizeJoins
from .quantize_matmuls import QuantizeMatmuls
from .refine_steps import RefineSteps
from .smooth import Smooth

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        PinFirstLast,
        Smooth,
        Observe,
        LSQ,
        ASQ,
        POT,
        POST,
        OutlierClamp,
        AdderGroups,
        AdderShared,
        LookupActivations,
        QuantizeMatmuls,
        QuantizeJoins,
        RefineSteps,
        BiasCorrection,
        Freeze,
    )
}

# The papers' schemes as pipelines (first/last-layer pinning is added by the spec).
SCHEMES: dict[str, str] = {
    "LSQ": "lsq",  # uniform weights and activations
    "LSQ+POT": "lsq,pot",
    "LSQ+POST": "lsq,post",
    "ASQ": "asq",  # adaptive activation steps, uniform weights
    "ASQ+POST": "asq,post",
    "adder-redistribution": "outlier-clamp,adder-groups",  # AdderNet PTQ
    "adder-shared": "adder-shared",  # one shared scale per adder layer (baseline)
}

__all__ = ["REGISTRY", "SCHEMES", "Pass", "PassContext", "PassResult", "PassManager", "PassRun", "plan"]
