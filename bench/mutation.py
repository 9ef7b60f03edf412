"""Mutation score of the numerics and the quantizers, killed by their own fast tests.

Runs mutmut (``pip install -e ".[mutation]"``; configured under ``[tool.mutmut]`` in
pyproject.toml) over ``qcompiler/numerics.py`` and ``qcompiler/quantizers/*.py``,
each mutant checked by the tests that cover its function among
``tests/test_numerics.py``, ``tests/quantizers/`` and ``tests/kernels/``. Then
it writes the score, every surviving mutant with its diff, and the argument for each
one this file calls equivalent (``EQUIVALENT``) to the results file.

    python bench/mutation.py --out bench/results/mutation.md            # run, then write
    python bench/mutation.py --report-only --out bench/results/mutation.md  # from the last run's mutants/

Mutation testing is CPU-heavy (~1250 mutants, 20-60 min on 2 cores): ``--jobs``
sets mutmut's parallel children (default 2). Results are cached in ``mutants/``,
so a rerun only checks what changed.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_header

KILLED = {1: "killed", 3: "killed"}
TIMEOUT = {-24: "timeout", 24: "timeout", 36: "timeout", 152: "timeout", 255: "timeout"}
SURVIVED, NO_TESTS = 0, {5, 33}
TARGET = 85.0

# Survivors argued equivalent: no test can tell them from the original because the
# program computes the same values. Keyed by a pattern matched against the mutant's
# name and its diff; each argument says why.
EQUIVALENT: list[tuple[str, str, str]] = [
    (r"_ASQǁbackward|_FusedLSQǁbackward|_FusedPowerGridǁbackward", r"\) or True",
     "computes a gradient autograd did not ask for; autograd discards a gradient returned for an input "
     "that does not require one, so every .grad is unchanged (only wasted work)"),
    (r"_ASQǁbackward", r"x\[1, 0\]|x\[0, 1\]",
     "x[0, 0], x[1, 0] and x[0, 1] all have the same number of elements (every sample and channel "
     "has the same spatial size), so the spread is the same"),
    (r"_ASQǁbackward", r"x\.dim\(\) >= 2|x\.dim\(\) > 2\) or True",
     "for a 2-d input (N, C) x[0, 0] is a scalar with numel() 1, the same divisor as the else branch"),
    (r"x_post_table", r"dtype=None|arange\(max_code \+ 1, \)",
     "np.arange of Python ints is int64 on the platforms torch supports (Linux/macOS x86-64 and arm64), "
     "the dtype the code names; the test checks the dtype and every value"),
    (r"x_fixed_point_multiplier__", r"real >= 0",
     "real == 0 returned (0, 0) two lines earlier, so > 0 and >= 0 agree on every value reaching this line"),
    (r"x_power_levels__", r"torch\.zeros\(1, dtype=None\)|torch\.zeros\(1, \)",
     "a float32 zero concatenated with float64 powers is promoted to float64: the same zero, same dtype"),
    (r"UniformQuantizerǁforward", r"keep = |self\.grad_scale\(x\), (None|)\)",
     "keep_grads only chooses whether _LSQ saves its gradient factors or recomputes them in backward "
     "(memory against time); values and gradients are identical either way"),
    (r"x_adapter_forward__", r"squeeze\(\+1\)",
     "F.linear(hidden, w2, b2) is (N, 1): squeeze(1) and squeeze(-1) name the same axis"),
    (r"ASQQuantizerǁforward", r"\(x\.dim\(\) >= 2\) or True",
     "only differs for 1-d inputs, which ASQ is not defined on (per-sample beta over (N, C, ...) "
     "activations, docs/design.md §4.3); the pass only attaches ASQ to activations with a batch and a channel axis"),
    (r"_LSQǁbackward", r"\) or True",
     "computes a gradient autograd did not ask for and then discards: every .grad is unchanged"),
    (r"x_round_clamp_|_LSQǁforward|x_round_half_even__", r"out=None|clamp_\(clamped, \)|out=clamped\)|, \)  #|qmax, \)|\(out is not None\) or True",
     "writes the result into a new array instead of the input's buffer (or passes out=None, which means the same): "
     "the same values, only more memory"),
    (r"x_lsq_quantize__", r"keep_grads: bool = True|grad_scale, None\)",
     "keep_grads only chooses whether _LSQ saves its gradient factors or recomputes them (memory against time)"),
    (r"x_fixed_point_multipliers__", r"asarray\(real, (dtype=None)?\)",
     "np.asarray of float64 or int64 values: frexp, rint and ldexp compute in float64 either way, the same results"),
    (r"x_fixed_point_multipliers__", r"np\.where\(None, 0|real >= 0",
     "for real == 0 frexp gives mantissa 0, so the multiplier is 0 on every branch, and the shift has its own "
     "zero mask: the outer mask and the sign test only matter where they agree"),
    (r"x_shift_round_half_even__", r"np\.minimum\(shift, 63\)|np\.any\(shift >= 62\)",
     "shifts of 63 are overwritten by the branch for shifts past 62, and entering that branch for a shift of 62 "
     "changes nothing because its np.where still selects shift > 62 only"),
    (r"x_adder_act_codes__", r"signed=None",
     "int_range tests signed for truth: None and False give the same unsigned range"),
    (r"ASQQuantizerǁforward", r"self\.step\.expand\(\*\(",
     "the expanded step only decides whether the kernel is usable (a float32 CPU scalar passes as a per-tensor "
     "step as well); _ASQ is then applied to self.step itself, so the same computation"),
    (r"UniformQuantizerǁ__init__", r"torch\.tensor\(2\.0\)",
     "the placeholder step is overwritten by init_from / init_from_max before any use (every pass initialises "
     "its quantizers); no result depends on it"),
    (r"UniformQuantizerǁelements_per_step", r"x\.numel\(\) / x\.shape",
     "numel is a multiple of the channel count: true division gives the same number, as a float, and it only "
     "enters a square root"),
    (r"x__at_most__", r"dtype=None|-math\.inf, \)",
     "torch.tensor(t) with no dtype is float32, the default dtype, so for float32 the same value; "
     "float16/bfloat16/float64 are tested and kill the other dtype mutants of this function"),
]


def mutmut(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["mutmut", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def exit_codes() -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for meta in glob.glob(str(ROOT / "mutants" / "qcompiler" / "**" / "*.meta"), recursive=True):
        codes.update(json.loads(Path(meta).read_text())["exit_code_by_key"])
    return codes


def diff_of(name: str) -> str:
    out = mutmut("show", name, timeout=120).stdout
    return "\n".join(line for line in out.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))


def argument(name: str, diff: str) -> str | None:
    for name_pattern, diff_pattern, why in EQUIVALENT:
        if re.search(name_pattern, name) and re.search(diff_pattern, diff):
            return why
    return None


def module_of(name: str) -> str:
    return name.split(".x")[0].split(".xǁ")[0]


def report(elapsed: float | None) -> tuple[str, float]:
    codes = exit_codes()
    status = Counter()
    for code in codes.values():
        if code in KILLED:
            status["killed"] += 1
        elif code in TIMEOUT:
            status["timeout"] += 1
        elif code == SURVIVED:
            status["survived"] += 1
        elif code in NO_TESTS:
            status["no tests"] += 1
        elif code is None:
            status["not checked"] += 1
        else:
            status[f"other ({code})"] += 1
    total = len(codes)
    survivors = sorted(n for n, c in codes.items() if c == SURVIVED)
    uncovered = sorted(n for n, c in codes.items() if c in NO_TESTS)
    argued = {}
    rows = []
    for name in survivors:
        diff = diff_of(name)
        why = argument(name, diff)
        if why:
            argued[name] = why
        rows.append((name, diff, why))
    killed = status["killed"] + status["timeout"]
    score = 100.0 * killed / total if total else 0.0
    score_argued = 100.0 * (killed + len(argued)) / total if total else 0.0

    per_module = Counter()
    per_module_killed = Counter()
    for n, c in codes.items():
        per_module[module_of(n)] += 1
        per_module_killed[module_of(n)] += c in KILLED or c in TIMEOUT
    lines = [
        f"Mutants: **{total}** over `qcompiler/numerics.py` and `qcompiler/quantizers/*.py` (mutmut 3.8.1, "
        "tests: `tests/test_numerics.py`, `tests/quantizers/`, `tests/kernels/`, each mutant checked by the tests "
        "that cover its function)." + (f" Run time {elapsed / 60:.0f} min." if elapsed else ""),
        "",
        f"**Score: {score:.1f} % killed** ({status['killed']} killed by a failing test, {status['timeout']} by a timeout, "
        f"of {total}); target >= {TARGET:g} %. Counting the {len(argued)} survivors argued equivalent below as "
        f"not mutants at all: {score_argued:.1f} %.",
        "",
        "| status | mutants |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(status.items())),
        "",
        "| module | mutants | killed (incl. timeout) | % |",
        "|---|---|---|---|",
        *(f"| `{m}` | {per_module[m]} | {per_module_killed[m]} | {100.0 * per_module_killed[m] / per_module[m]:.1f} |"
          for m in sorted(per_module)),
        "",
        "A timeout is a mutant whose tests ran past mutmut's CPU-time limit (15x the tests' own time + 1 s): the "
        "mutant made them loop or crawl, which a test run would not pass either.",
        "",
        f"## Surviving mutants ({len(survivors)})",
        "",
        "Each is either argued equivalent (the same values for every input) or left open, marked **open**.",
        "",
    ]
    for name, diff, why in rows:
        lines += [f"### `{name}`", "", "```diff", diff, "```", "", f"Equivalent: {why}" if why else "**open**: no test kills it yet.", ""]
    if uncovered:
        by_function = Counter(re.sub(r"__mutmut_\d+$", "", n) for n in uncovered)
        lines += [f"## Not covered by the fast tests ({len(uncovered)})", "",
                  *(f"- `{f}`: {k} mutant(s)" for f, k in sorted(by_function.items())), ""]
    return "\n".join(lines), score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="mutmut --max-children")
    p.add_argument("--report-only", action="store_true", help="write the report from the last run's mutants/")
    p.add_argument("--out", type=Path, help="write the results file here")
    p.add_argument("--check", action="store_true", help=f"exit 1 if the score is below {TARGET:g} %%")
    args = p.parse_args(argv)
    elapsed = None
    if not args.report_only:
        start = time.perf_counter()
        subprocess.run(["mutmut", "run", "--max-children", str(args.jobs)], cwd=ROOT, check=False)
        elapsed = time.perf_counter() - start
    text, score = report(elapsed)
    print(text)
    if args.out is not None:
        import results_header

        results_header.write(args.out, "Mutation testing: numerics and quantizers (bench/mutation.py)", text)
    return 1 if args.check and score < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
