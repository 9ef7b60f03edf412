"""The pass interface.

How to write a pass:
  1. Subclass ``Pass`` in a file named after it; set ``name``, ``purpose``,
     ``stage``, and the facts it ``requires`` and ``produces``.
  2. ``run(gm, ctx)`` reads records with ``qcompiler.ir.get``, edits the graph
     (collect edits first, then apply), writes records, and returns
     ``PassResult(gm, changed)``. A second run on its own output must report
     ``changed=False``.
  3. Add the class to ``REGISTRY`` in ``passes/__init__.py``; the manager does the
     ordering, linting, recompiling, verifying, timing and IR dumps.
  4. Something of its own to report (a cost table)? Override ``report_section``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from ..distributed import LOCAL, Ranks
from ..report import ReportSection
from ..spec import QuantSpec

# Facts the context itself can provide, rather than a pass.
CALIBRATION_DATA = "calibration-data"


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


@dataclass
class PassContext:
    """What a pass may read besides the graph: the spec and the data.

    ``ranks``: the processes compiling together (:mod:`qcompiler.distributed`);
    ``calib_batches`` are this rank's share, and a pass that measures them reduces
    what it measured over ``ranks`` before using it.
    """

    spec: QuantSpec
    example_inputs: tuple[torch.Tensor, ...]
    calib_batches: list[torch.Tensor] = field(default_factory=list)
    progress: bool = False
    ranks: Ranks = LOCAL

    def provided(self) -> set[str]:
        return {CALIBRATION_DATA} if self.calib_batches else set()


class Pass(abc.ABC):
    """One step of the pipeline; see the module docstring for the recipe."""

    name: ClassVar[str]
    purpose: ClassVar[str]
    # Passes run in ascending stage; the user's order breaks no ties across stages.
    stage: ClassVar[int]
    requires: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    # Names of passes that cannot share a pipeline with this one.
    conflicts: ClassVar[frozenset[str]] = frozenset()
    # An analysis is inserted automatically when a later pass requires its facts.
    analysis: ClassVar[bool] = False
    # Inserted by the planner where it may legitimately find nothing (a model with no joins).
    quiet_when_unchanged: ClassVar[bool] = False
    # Module types without which the pass has nothing to do (adder passes need adder layers):
    # asked for on a model that has none, it is a mistake, refused unless forced.
    needs_layers: ClassVar[tuple[type, ...]] = ()

    @classmethod
    def from_spec(cls, spec: QuantSpec) -> Pass:
        """The pass configured from the user's spec (override when it has settings)."""
        return cls()

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...

    @classmethod
    def report_section(cls, gm: fx.GraphModule, spec: QuantSpec) -> ReportSection | None:
        """This pass's table for the compile report, read from the final ``gm``; most have none."""
        return None


# Stage numbers, in pipeline order.
STAGE_ANALYSIS = 0
STAGE_CALIBRATE = 1
STAGE_ACTIVATIONS = 2
STAGE_WEIGHT_GRID = 3
STAGE_ADDER = 4
STAGE_JOIN = 5
STAGE_CORRECT = 6
STAGE_FREEZE = 7
