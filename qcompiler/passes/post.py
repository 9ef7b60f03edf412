"""``post``: weights on a powers-of-sqrt(2) grid (POST, docs/design.md §4.4).

Finer than powers of two near the clip value, where bell-shaped weight
distributions need resolution, yet still computed with shifts plus one small table.
"""

from __future__ import annotations

from .power_grid import PowerGridPass


class POST(PowerGridPass):
    name = "post"
    purpose = "per-channel weights on alpha * {0, ±sqrt(2)^-k}"
    grid = "post"
    conflicts = frozenset({"pot"})
