"""Compile time of qcompiler (trace + passes, calibration excluded) against torch.ao FX QAT.

A second table includes calibration on both sides: qcompiler's calibration passes
(``observe``) next to torch.ao running its prepared model over the same calibration
batches (its observers recording ranges), so neither ratio hides the other.

For each model, in one run: qcompiler's ``trace`` plus every pass of
``QuantSpec(passes="lsq")`` except the calibration passes (those that read
calibration data, i.e. ``observe``), as timed by ``compiled.report`` (the pass
manager's lint + recompile after ``observe`` falls inside its excluded time), next to
torch.ao's ``prepare_qat_fx`` + ``convert_fx`` (default QAT qconfig mapping) on
the same float model. qcompiler's trace includes its deep copy of the model and a
ShapeProp forward pass on the example input; both are part of compiling, so they
stay in. Every repetition starts from a fresh deep copy of the float model on both
sides (copy time excluded from both). One warm-up run per side, then the median of
``--repeats`` runs, the two sides interleaved (alternating which goes first) so
that load from elsewhere on the machine hits both alike. One intra-op thread.

Inputs: ResNet-20 1x3x32x32; ResNet-50 1x3x224x224. The input size matters to
qcompiler (ShapeProp runs the model once on it) and not to torch.ao (its
``example_inputs`` are not run), so the full ImageNet size is used.
Calibration data: 8 random samples (excluded from the time anyway).
Target: qcompiler / torch.ao <= 0.25.

    python bench/compile_time.py                     # print the table
    python bench/compile_time.py --check             # also exit 1 when a target is missed
    python bench/compile_time.py --models resnet20 --repeats 9
    python bench/compile_time.py --out bench/results/compile_time.md   # also write the results file
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_header

import qcompiler  # noqa: E402
from qcompiler.api import calibration_batches  # noqa: E402
from qcompiler.passes import REGISTRY  # noqa: E402
from qcompiler.passes.base import CALIBRATION_DATA  # noqa: E402
from qcompiler.report import text_table  # noqa: E402
from qcompiler.zoo import resnet20, resnet50  # noqa: E402

TARGET_RATIO = 0.25
CALIB_SAMPLES = 8

# name -> (factory, example input shape)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet20": (lambda: resnet20(in_channels=3), (1, 3, 32, 32)),
    "resnet50": (lambda: resnet50(in_channels=3, num_classes=1000), (1, 3, 224, 224)),
}


@dataclass(frozen=True)
class QcRun:
    trace: float
    passes: float  # every pass except calibration
    calibration: float  # the excluded passes, for context

    @property
    def total(self) -> float:
        return self.trace + self.passes


@dataclass(frozen=True)
class AoRun:
    prepare: float
    convert: float
    observe: float = 0.0  # the prepared model run over the calibration batches (its observers record)

    @property
    def total(self) -> float:
        return self.prepare + self.convert


@dataclass(frozen=True)
class Result:
    model: str
    input_shape: tuple[int, ...]
    qc: QcRun  # medians of each column
    ao: AoRun
    qc_total: float  # median of the per-run totals
    ao_total: float
    excluded: tuple[str, ...]

    @property
    def ratio(self) -> float:
        return self.qc_total / self.ao_total

    @property
    def ok(self) -> bool:
        return self.ratio <= TARGET_RATIO

    @property
    def qc_with_calibration(self) -> float:
        return self.qc_total + self.qc.calibration

    @property
    def ao_with_calibration(self) -> float:
        return self.ao_total + self.ao.observe

    @property
    def ratio_with_calibration(self) -> float:
        """Both sides observing the same calibration batches: qcompiler's ``observe`` against torch.ao's observers."""
        return self.qc_with_calibration / self.ao_with_calibration


def is_calibration(pass_name: str) -> bool:
    """A pass that reads calibration data (``observe``): its time is calibration."""
    cls = REGISTRY.get(pass_name)
    return pass_name == "observe" or (cls is not None and CALIBRATION_DATA in cls.requires)


def run_qcompiler(model: nn.Module, x: torch.Tensor, calib: torch.Tensor) -> tuple[QcRun, tuple[str, ...]]:
    spec = qcompiler.QuantSpec(passes="lsq")
    report = qcompiler.compile(model, spec, calib_data=calib, example_inputs=(x,)).report
    excluded = tuple(p.name for p in report.passes if is_calibration(p.name))
    passes = sum(p.seconds for p in report.passes if not is_calibration(p.name))
    calibration = sum(p.seconds for p in report.passes if is_calibration(p.name))
    return QcRun(report.trace_seconds, passes, calibration), excluded


def run_torch_ao(model: nn.Module, x: torch.Tensor, calib_batches: list[torch.Tensor]) -> AoRun:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated; its deprecation and observer warnings are noise here.
        warnings.simplefilter("ignore")
        qconfig_mapping = get_default_qat_qconfig_mapping()
        model.train()
        start = time.perf_counter()
        prepared = prepare_qat_fx(model, qconfig_mapping, (x,))
        mid = time.perf_counter()
        prepared.eval()  # fake-quant observers record in eval mode too
        with torch.no_grad():
            for batch in calib_batches:
                prepared(batch)
        observed = time.perf_counter()
        convert_fx(prepared)
        end = time.perf_counter()
    return AoRun(mid - start, end - observed, observed - mid)


def measure(name: str, repeats: int, warmup: int = 1) -> Result:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(shape)
    calib = torch.randn(CALIB_SAMPLES, *shape[1:])
    calib_batches = calibration_batches(calib, limit=10**9)  # the batches qcompiler's observe pass sees

    def qc_once() -> tuple[QcRun, tuple[str, ...]]:
        m = copy.deepcopy(model)  # outside qcompiler's own timers
        gc.collect()
        return run_qcompiler(m, x, calib)

    def ao_once() -> AoRun:
        m = copy.deepcopy(model)  # outside the timed region
        gc.collect()
        return run_torch_ao(m, x, calib_batches)

    for _ in range(warmup):
        qc_once()
        ao_once()
    qc_runs: list[QcRun] = []
    ao_runs: list[AoRun] = []
    excluded: tuple[str, ...] = ()
    for i in range(repeats):
        if i % 2 == 0:
            run, excluded = qc_once()
            qc_runs.append(run)
            ao_runs.append(ao_once())
        else:
            ao_runs.append(ao_once())
            run, excluded = qc_once()
            qc_runs.append(run)

    med = statistics.median
    return Result(
        model=name,
        input_shape=shape,
        qc=QcRun(med(r.trace for r in qc_runs), med(r.passes for r in qc_runs), med(r.calibration for r in qc_runs)),
        ao=AoRun(med(r.prepare for r in ao_runs), med(r.convert for r in ao_runs), med(r.observe for r in ao_runs)),
        qc_total=med(r.total for r in qc_runs),
        ao_total=med(r.total for r in ao_runs),
        excluded=excluded,
    )


def format_table(results: list[Result]) -> str:
    head = ("model", "input", "qcompiler ms", "(trace / passes)", "torch.ao ms", "(prepare / convert)", "ratio", "target", "result")
    rows = [
        (
            r.model,
            "x".join(map(str, r.input_shape)),
            f"{r.qc_total * 1e3:.1f}",
            f"({r.qc.trace * 1e3:.1f} / {r.qc.passes * 1e3:.1f})",
            f"{r.ao_total * 1e3:.1f}",
            f"({r.ao.prepare * 1e3:.1f} / {r.ao.convert * 1e3:.1f})",
            f"{r.ratio:.3f}",
            f"<= {TARGET_RATIO:g}",
            "PASS" if r.ok else "MISS",
        )
        for r in results
    ]
    return text_table(head, rows)


def format_calibration_table(results: list[Result]) -> str:
    head = ("model", "qcompiler + observe ms", "torch.ao + observing ms", "ratio with calibration")
    rows = [
        (r.model, f"{r.qc_with_calibration * 1e3:.1f} (+{r.qc.calibration * 1e3:.1f})",
         f"{r.ao_with_calibration * 1e3:.1f} (+{r.ao.observe * 1e3:.1f})", f"{r.ratio_with_calibration:.3f}")
        for r in results
    ]
    return text_table(head, rows)


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 unless every ratio <= {TARGET_RATIO:g}")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    parser.add_argument("--models", type=parse_models, default=list(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--out", type=Path, help="also write the output, headed by the command and machine, to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [measure(name, args.repeats, args.warmup) for name in args.models]
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    excluded = sorted({n for r in results for n in r.excluded})
    ok = all(r.ok and math.isfinite(r.ratio) for r in results)
    text = "\n".join([
        f"torch {torch.__version__}; threads {threads}; "
        f"median of {args.repeats} after {args.warmup} warm-up; calibration: {CALIB_SAMPLES} random samples",
        "qcompiler = trace (deep copy + fx trace + ShapeProp) + passes except calibration "
        f"(excluded: {', '.join(excluded) or 'none'}); torch.ao = prepare_qat_fx + convert_fx",
        format_table(results),
        *(f"  {r.model}: excluded calibration took {r.qc.calibration * 1e3:.1f} ms (median, for context)" for r in results),
        "target met" if ok else "TARGET MISSED",
        "",
        "With calibration on both sides: qcompiler's observe passes, and torch.ao's prepared model run over "
        "the same calibration batches (eval mode, observers recording) before convert_fx:",
        format_calibration_table(results),
    ])
    print(text)
    if args.out is not None:
        import results_header

        results_header.write(args.out, "Compile time: qcompiler against torch.ao FX QAT (bench/compile_time.py)",
                             "```\n" + text + "\n```", threads=threads)
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
