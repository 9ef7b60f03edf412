"""``adder-shared``: one scale per adder layer, shared by weights and input (the baseline).

The earlier approach the redistribution paper improves on: a single grid whose range
covers both the largest weight and the largest input, no clamp, no groups. Kept as a
pass so the benefit of ``adder-groups`` is measured against it, not asserted.
"""

from __future__ import annotations

from ..spec import QuantSpec
from .adder_groups import AdderGroups


class AdderShared(AdderGroups):
    name = "adder-shared"
    purpose = "one scale per adder layer shared by weights and input, no clamp (baseline)"
    conflicts = frozenset({"adder-groups"})
    method = "shared"

    @classmethod
    def from_spec(cls, spec: QuantSpec) -> AdderShared:
        return cls(groups=1, weight_clamp=False, seed=spec.seed)
