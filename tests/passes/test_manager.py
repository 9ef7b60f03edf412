"""Tests for qcompiler.passes.manager: pipeline planning and the pass manager."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompiler
from qcompiler.errors import PassError, PipelineError, QCompileError, SpecError
from qcompiler.frontend import trace
from qcompiler.passes import REGISTRY, Pass, PassContext, PassManager, PassResult, plan
from qcompiler.passes.base import CALIBRATION_DATA, STAGE_ACTIVATIONS, STAGE_ANALYSIS, STAGE_WEIGHT_GRID
from qcompiler.spec import QuantSpec

CALIB = {CALIBRATION_DATA}


# --------------------------------------------------------------------------- fake passes


class _Noop(Pass):
    name = "noop"
    purpose = "does nothing"
    stage = STAGE_ACTIVATIONS

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, False)


class FakeAnalysis(_Noop):
    name = "fake-analysis"
    purpose = "produces fact-a from nothing"
    stage = STAGE_ANALYSIS
    produces = frozenset({"fact-a"})
    analysis = True


class NeedsA(_Noop):
    name = "needs-a"
    purpose = "reads fact-a"
    requires = frozenset({"fact-a"})


class MakesB(_Noop):
    name = "makes-b"
    purpose = "a rewrite producing fact-b"
    stage = STAGE_ACTIVATIONS
    produces = frozenset({"fact-b"})


class NeedsB(_Noop):
    name = "needs-b"
    purpose = "reads fact-b, which only a non-analysis pass produces"
    stage = STAGE_WEIGHT_GRID
    requires = frozenset({"fact-b"})


class NeedsNobody(_Noop):
    name = "needs-nobody"
    purpose = "reads a fact no pass produces"
    requires = frozenset({"fact-z"})


class NeedsData(_Noop):
    name = "needs-data"
    purpose = "reads calibration data directly"
    requires = frozenset({CALIBRATION_DATA})


class AnalysisNeedsZ(_Noop):
    name = "analysis-needs-z"
    purpose = "an analysis producing fact-y but needing fact-z, which nobody produces"
    stage = STAGE_ANALYSIS
    produces = frozenset({"fact-y"})
    requires = frozenset({"fact-z"})
    analysis = True


class NeedsY(_Noop):
    name = "needs-y"
    purpose = "reads fact-y"
    requires = frozenset({"fact-y"})


class Grid1(_Noop):
    name = "grid1"
    purpose = "weight grid one"
    stage = STAGE_WEIGHT_GRID
    conflicts = frozenset({"grid2"})


class Grid2(_Noop):
    name = "grid2"
    purpose = "weight grid two"
    stage = STAGE_WEIGHT_GRID


class StageZeroNeedsRanges(_Noop):
    name = "early"
    purpose = "an analysis-stage pass reading ranges"
    stage = STAGE_ANALYSIS
    requires = frozenset({"ranges"})


FAKES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (FakeAnalysis, NeedsA, MakesB, NeedsB, NeedsNobody, NeedsData, AnalysisNeedsZ, NeedsY, Grid1, Grid2)
}


def _names(passes: list[Pass]) -> list[str]:
    return [p.name for p in passes]


# --------------------------------------------------------------------------- plan


def test_real_pipeline_inserts_pin_and_observe() -> None:
    spec = QuantSpec(passes="lsq")
    assert _names(plan(spec.passes, spec, CALIB, REGISTRY)) == ["pin-first-last", "observe", "lsq", "quantize-matmuls", "quantize-joins", "bias-correction", "freeze"]
    nopin = spec.replace(pin_first_last=False)
    assert _names(plan(nopin.passes, nopin, CALIB, REGISTRY)) == ["observe", "lsq", "quantize-matmuls", "quantize-joins", "bias-correction", "freeze"]


@pytest.mark.parametrize("names", [("observe", "lsq"), ("lsq", "observe"), ("lsq", "pin-first-last", "observe")])
def test_explicit_analysis_not_duplicated(names: tuple[str, ...]) -> None:
    spec = QuantSpec(passes=names)
    assert _names(plan(names, spec, CALIB, REGISTRY)) == ["pin-first-last", "observe", "lsq", "quantize-matmuls", "quantize-joins", "bias-correction", "freeze"]


def test_plan_configures_from_spec() -> None:
    spec = QuantSpec(pin_bits=6)
    passes = plan(("lsq",), spec, CALIB, REGISTRY)
    assert passes[0].bits == 6  # type: ignore[attr-defined]


def test_unknown_pass_lists_valid_names() -> None:
    spec = QuantSpec(passes="lsq,lsqq")
    with pytest.raises(PipelineError) as info:
        plan(spec.passes, spec, CALIB, REGISTRY)
    message = str(info.value)
    assert "'lsqq'" in message and "\n" not in message
    for name in REGISTRY:
        assert name in message
    assert isinstance(info.value, SpecError) and isinstance(info.value, QCompileError)


def test_pass_listed_twice() -> None:
    spec = QuantSpec(passes="lsq,observe,lsq")
    with pytest.raises(PipelineError, match="'lsq' is listed twice"):
        plan(spec.passes, spec, CALIB, REGISTRY)


def test_lsq_conflicts_with_asq() -> None:
    """``lsq`` declares a conflict with ``asq``; a stand-in is used while ``asq`` does not exist."""

    class FakeASQ(_Noop):
        name = "asq"
        purpose = "stand-in for the adaptive-step pass"

    registry = dict(REGISTRY) if "asq" in REGISTRY else {**REGISTRY, "asq": FakeASQ}
    spec = QuantSpec()
    for names in (("lsq", "asq"), ("asq", "lsq")):
        with pytest.raises(PipelineError) as info:
            plan(names, spec, CALIB, registry)
        message = str(info.value)
        assert "'lsq'" in message and "'asq'" in message and "conflict" in message


def test_conflict_declared_on_either_side() -> None:
    spec = QuantSpec(pin_first_last=False)
    with pytest.raises(PipelineError, match="conflict"):
        plan(("grid1", "grid2"), spec, CALIB, FAKES)
    with pytest.raises(PipelineError, match="conflict"):
        plan(("grid2", "grid1"), spec, CALIB, FAKES)
    assert _names(plan(("grid2",), spec, CALIB, FAKES)) == ["grid2"]



def _declared_conflicts() -> list[tuple[str, str]]:
    return sorted({tuple(sorted((a, b))) for a, cls in REGISTRY.items() for b in cls.conflicts})


def test_the_registry_declares_the_documented_conflicts() -> None:
    assert _declared_conflicts() == [("adder-groups", "adder-shared"), ("asq", "lsq"), ("post", "pot")]


@pytest.mark.parametrize("pair", _declared_conflicts(), ids="-".join)
@pytest.mark.parametrize("between", [("lsq", "observe"), ("observe", "outlier-clamp"), ("pin-first-last", "post", "lsq")])
def test_conflicts_are_refused_anywhere_in_the_list(pair: tuple[str, str], between: tuple[str, ...]) -> None:
    """A conflicting pair is refused with other passes between them, in either order (``post,lsq,pot``)."""
    spec = QuantSpec()
    a, b = pair
    between = tuple(n for n in between if n not in pair and not ({n} & {c for p in pair for c in REGISTRY[p].conflicts}))
    assert between  # something really stands between the two
    for names in ((a, *between, b), (b, *between, a)):
        with pytest.raises(PipelineError) as info:
            plan(names, spec, CALIB, REGISTRY)
        message = str(info.value)
        assert f"{a!r}" in message and f"{b!r}" in message and "conflict" in message, names


def test_post_lsq_pot_is_refused() -> None:
    spec = QuantSpec(passes="post,lsq,pot")
    with pytest.raises(PipelineError, match="'post' and 'pot' conflict"):
        plan(spec.passes, spec, CALIB, REGISTRY)
    with pytest.raises(PipelineError, match="conflict"):
        qcompiler.compile(_tiny(), spec, calib_data=torch.randn(4, 1, 6, 6))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_order_of_passes_with_a_conflicting_pair_is_refused(data) -> None:
    pair = data.draw(st.sampled_from(_declared_conflicts()))
    others = [n for n in ("observe", "lsq", "post", "outlier-clamp", "pin-first-last")
              if n not in pair and not ({n} & {c for p in pair for c in REGISTRY[p].conflicts})]
    names = data.draw(st.permutations([*pair, *data.draw(st.lists(st.sampled_from(others), unique=True))]))
    with pytest.raises(PipelineError, match="conflict"):
        plan(tuple(names), QuantSpec(), CALIB, REGISTRY)


def test_missing_prerequisite_from_non_analysis_pass() -> None:
    spec = QuantSpec()
    with pytest.raises(PipelineError) as info:
        plan(("needs-b",), spec, CALIB, FAKES)
    message = str(info.value)
    assert "'needs-b'" in message and "'fact-b'" in message and "add 'makes-b' before it" in message
    # Listing the provider fixes it (it runs in an earlier stage).
    assert _names(plan(("needs-b", "makes-b"), spec, CALIB, FAKES)) == ["makes-b", "needs-b"]


def test_missing_prerequisite_nobody_produces() -> None:
    with pytest.raises(PipelineError, match="no pass produces it"):
        plan(("needs-nobody",), QuantSpec(), CALIB, FAKES)


def test_analysis_auto_inserted_once() -> None:
    class NeedsAToo(NeedsA):
        name = "needs-a-too"

    registry = {**FAKES, "needs-a-too": NeedsAToo}
    assert _names(plan(("needs-a", "needs-a-too"), QuantSpec(), set(), registry)) == [
        "fake-analysis", "needs-a", "needs-a-too"
    ]


def test_no_pin_pass_in_registry_is_fine() -> None:
    assert _names(plan(("needs-a",), QuantSpec(pin_first_last=True), set(), FAKES)) == ["fake-analysis", "needs-a"]


def test_no_calibration_data() -> None:
    spec = QuantSpec(passes="lsq")
    with pytest.raises(PipelineError) as info:
        plan(spec.passes, spec, set(), REGISTRY)
    message = str(info.value)
    assert "--data" in message and "calibration data" in message and "'observe'" in message
    with pytest.raises(PipelineError, match="--data"):
        plan(("observe",), spec, set(), REGISTRY)
    with pytest.raises(PipelineError, match="--data"):
        plan(("needs-data",), spec, set(), FAKES)


def test_no_calibration_data_through_compile() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(PipelineError, match="--data"):
        qcompiler.compile(model, QuantSpec(passes="lsq"), example_inputs=torch.randn(2, 4))


def test_auto_inserted_analysis_prerequisites_checked() -> None:
    with pytest.raises(PipelineError, match="fact-z"):
        plan(("needs-y",), QuantSpec(), CALIB, FAKES)


def test_user_listed_analysis_not_run_twice_within_a_stage() -> None:
    registry = {**REGISTRY, "early": StageZeroNeedsRanges}
    names = _names(plan(("early", "observe"), QuantSpec(pin_first_last=False), CALIB, registry))
    assert names.count("observe") == 1


# --------------------------------------------------------------------------- PassManager


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def _ctx(spec: QuantSpec | None = None) -> PassContext:
    torch.manual_seed(1)
    batches = [torch.randn(4, 1, 6, 6) for _ in range(2)]
    return PassContext(spec=spec or QuantSpec(passes="lsq"), example_inputs=(batches[0],), calib_batches=batches)


class Boom(_Noop):
    name = "boom"
    purpose = "raises a plain Python error"
    stage = STAGE_WEIGHT_GRID

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise ValueError("something broke\n\nWhile executing %x = ...\nOriginal traceback: ...")


class UserBoom(Boom):
    name = "user-boom"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise SpecError("bad user input, one line")


class MakeInf(_Noop):
    name = "make-inf"
    purpose = "multiplies the output by infinity"
    stage = STAGE_WEIGHT_GRID

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        src = out.args[0]
        with gm.graph.inserting_before(out):
            bad = gm.graph.call_function(operator.mul, (src, float("inf")))
        out.replace_input_with(src, bad)
        return PassResult(gm, True)


class BreakGraph(_Noop):
    name = "break-graph"
    purpose = "leaves a node that uses a value defined after it"
    stage = STAGE_WEIGHT_GRID

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = list(gm.graph.nodes)
        first_layer = next(n for n in nodes if n.op == "call_module")
        last_layer = [n for n in nodes if n.op == "call_module"][-1]
        first_layer.args = (last_layer,)  # a use before its definition: lint must fail
        return PassResult(gm, True)


def _run(extra: type[Pass], dump_dir: Path | None = None, verify: bool = False) -> tuple[fx.GraphModule, list]:
    ctx = _ctx()
    registry = {**REGISTRY, extra.name: extra}
    passes = plan(("lsq", extra.name), ctx.spec, ctx.provided(), registry)
    gm = trace(_tiny(), ctx.example_inputs)
    return PassManager(passes, dump_dir=dump_dir, verify=verify).run(gm, ctx)


def test_pass_error_names_pass_and_those_before() -> None:
    with pytest.raises(PassError) as info:
        _run(Boom)
    message = str(info.value)
    assert message.startswith("error in pass 'boom' after passes [pin-first-last, observe, lsq, quantize-matmuls]")
    assert message.endswith("ValueError: something broke")  # one line: fx's context stays in __cause__
    assert isinstance(info.value.__cause__, ValueError)


def test_pass_error_first_pass() -> None:
    ctx = _ctx()
    gm = trace(_tiny(), ctx.example_inputs)
    with pytest.raises(PassError, match=r"error in pass 'boom' after passes \[none\]"):
        PassManager([Boom()]).run(gm, ctx)


def test_user_errors_from_a_pass_pass_through() -> None:
    with pytest.raises(SpecError) as info:
        _run(UserBoom)
    assert not isinstance(info.value, PassError)
    assert str(info.value) == "bad user input, one line"


def test_lint_failure_is_a_pass_error() -> None:
    with pytest.raises(PassError, match="'break-graph'"):
        _run(BreakGraph)


def test_verify_catches_non_finite_outputs() -> None:
    with pytest.raises(PassError) as info:
        _run(MakeInf, verify=True)
    message = str(info.value)
    assert "'make-inf'" in message and "non-finite" in message
    gm, runs = _run(MakeInf, verify=False)  # without verification nobody notices
    assert runs[-1].modified
    with torch.no_grad():
        assert not torch.isfinite(gm(_ctx().example_inputs[0])).all()


def test_verify_passes_a_good_pipeline_and_keeps_mode() -> None:
    ctx = _ctx()
    gm = trace(_tiny(), ctx.example_inputs).train()
    gm, runs = PassManager(plan(("lsq",), ctx.spec, ctx.provided(), REGISTRY), verify=True).run(gm, ctx)
    assert [r.name for r in runs] == ["pin-first-last", "observe", "lsq", "quantize-matmuls", "quantize-joins", "bias-correction", "freeze"]
    assert [r.modified for r in runs] == [True, True, True, False, False, True, True]  # the tiny model has no product, no join
    assert all(r.seconds >= 0 and r.dump is None for r in runs)
    assert gm.training


def test_dumps_are_numbered(tmp_path: Path) -> None:
    gm, runs = _run(MakeInf, dump_dir=tmp_path / "ir")
    stems = ["00_input", "01_pin-first-last", "02_observe", "03_lsq", "04_quantize-matmuls", "05_make-inf", "06_quantize-joins", "07_bias-correction", "08_freeze"]
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == sorted(
        f"{s}.{ext}" for s in stems for ext in ("txt", "dot")
    )
    assert [r.dump for r in runs] == [tmp_path / "ir" / f"{s}.txt" for s in stems[1:]]
    text = (tmp_path / "ir" / "03_lsq.txt").read_text()
    assert text.startswith("# after pass 3: lsq (")
    assert "modified=True" in text.splitlines()[0]
    assert (tmp_path / "ir" / "00_input.txt").read_text().startswith("# traced input, before any pass")
    for stem in stems:
        dot = (tmp_path / "ir" / f"{stem}.dot").read_text()
        assert dot.startswith("digraph") and dot.rstrip().endswith("}")


def test_second_run_of_pipeline_adds_nothing() -> None:
    ctx = _ctx()
    passes = plan(("lsq",), ctx.spec, ctx.provided(), REGISTRY)
    gm, first = PassManager(passes).run(trace(_tiny(), ctx.example_inputs), ctx)
    n_nodes = len(gm.graph.nodes)
    from qcompiler.passes.manager import NoChangeWarning

    with pytest.warns(NoChangeWarning) as caught:
        gm, second = PassManager(passes).run(gm, ctx)
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["lsq", "pin-first-last"]
    assert [r.modified for r in first] == [True, True, True, False, False, True, True]
    modified = {r.name: r.modified for r in second}
    assert not modified["pin-first-last"] and not modified["lsq"]
    assert len(gm.graph.nodes) == n_nodes


def test_an_adder_pass_without_adder_layers_is_refused_unless_forced():
    from qcompiler.passes.manager import NoChangeWarning
    from qcompiler.zoo import plain_cnn

    with pytest.raises(qcompiler.errors.PipelineError, match="'adder-groups' works on AdderConv2d layers and this model has none"):
        qcompiler.compile(plain_cnn(width=4), qcompiler.QuantSpec(passes="adder-groups"), calib_data=torch.randn(8, 1, 8, 8))
    with pytest.warns(NoChangeWarning, match="'adder-groups' found nothing to change"):
        qcompiler.compile(plain_cnn(width=4), qcompiler.QuantSpec(passes="adder-groups"), calib_data=torch.randn(8, 1, 8, 8),
                          force=True)
