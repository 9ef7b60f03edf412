"""``pot``: weights on a powers-of-two grid (POT, docs/design.md §4.4).

Every non-zero weight is a pure shift; the coarse spacing near the clip value is
what POST improves on.
"""

from __future__ import annotations

from .power_grid import PowerGridPass


class POT(PowerGridPass):
    name = "pot"
    purpose = "per-channel weights on alpha * {0, ±2^-k}"
    grid = "pot"
    conflicts = frozenset({"post"})
