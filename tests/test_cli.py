"""End-to-end tests of the ``qcompile`` command line, each run in a subprocess.

Every invocation starts a fresh interpreter (about 3 s of imports), so all of them
are launched together from one module fixture, ``QC_CLI_JOBS`` (default 2) at a
time, and the tests then check the finished runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from qcompiler.data import load_digits
from qcompiler.modelio import save_checkpoint
from qcompiler.spec import QuantSpec
from qcompiler.train import TrainConfig, train
from qcompiler.zoo import resnet20
from small_models import hardswish_cnn
from untraceable_helpers import gated_net

TESTS_DIR = Path(__file__).parent
ARCH = "qcompiler.zoo:resnet20"
ARCH_KWARGS = {"in_channels": 1, "width": 8}


@dataclass
class Run:
    """One finished CLI invocation and the folder it ran in."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    work: Path  # the working directory: --out is work/out, --dump-ir is work/ir, TMPDIR is work/tmp

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def ir(self) -> Path:
        return self.work / "ir"


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # This checkout's package first: an installed (editable) qcompiler may be another checkout.
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    (work / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(work / "tmp")  # catches temporary files left behind
    return env


def _run_cli(args: list[str], work: Path) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "qcompiler.cli", *args],
        cwd=work,
        env=_env(work),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Run(args, proc.returncode, proc.stdout, proc.stderr, work)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Files:
    checkpoint: Path  # qcompiler checkpoint of a trained resnet20(in_channels=1, width=8)
    state_dict: Path  # the same weights as a bare state_dict
    pickled: Path  # the same model as a whole pickled module
    untraceable: Path  # state_dict of untraceable_helpers.gated_net()
    hardswish: Path  # state_dict of small_models.hardswish_cnn(), untrained
    empty_npz: Path
    wrong_shape_npz: Path
    tiny_npz: Path  # 16 digit-shaped samples: a cheap compile
    a_file: Path  # a regular file, for "--out FILE/sub"


def _make_files(root: Path) -> Files:
    torch.manual_seed(0)
    model = resnet20(**ARCH_KWARGS)
    train(model, load_digits(), TrainConfig(epochs=1, lr=0.1), progress=False)
    files = Files(
        checkpoint=root / "resnet20.pt",
        state_dict=root / "resnet20_state.pt",
        pickled=root / "resnet20_pickled.pt",
        untraceable=root / "gated_state.pt",
        hardswish=root / "hardswish_state.pt",
        empty_npz=root / "empty.npz",
        wrong_shape_npz=root / "rgb.npz",
        tiny_npz=root / "tiny.npz",
        a_file=root / "a_file.txt",
    )
    save_checkpoint(model, files.checkpoint, ARCH, ARCH_KWARGS)
    torch.save(model.state_dict(), files.state_dict)
    torch.save(model, files.pickled)
    torch.save(gated_net(in_channels=1).state_dict(), files.untraceable)
    torch.save(hardswish_cnn().state_dict(), files.hardswish)
    np.savez(files.empty_npz, x=np.zeros((0, 1, 8, 8), dtype=np.float32), y=np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng(0)
    np.savez(files.wrong_shape_npz, x=rng.normal(size=(20, 3, 5, 5)).astype(np.float32), y=np.arange(20) % 4)
    np.savez(files.tiny_npz, x=rng.normal(size=(16, 1, 8, 8)).astype(np.float32), y=np.arange(16) % 4)
    files.a_file.write_text("not a folder\n")
    return files


OUT = ["--out", "out", "--dump-ir", "ir"]

# name -> argv (from the input files), each must fail with exit status 2 and one line.
BAD: dict[str, Callable[[Files], list[str]]] = {
    "unknown_pass": lambda f: [str(f.checkpoint), "--passes", "lsq,nope", *OUT],
    "bits_0": lambda f: [str(f.checkpoint), "--bits", "0", *OUT],
    "bits_1": lambda f: [str(f.checkpoint), "--bits", "1", *OUT],
    "bits_33": lambda f: [str(f.checkpoint), "--bits", "33", *OUT],
    "empty_npz": lambda f: [str(f.checkpoint), "--data", str(f.empty_npz), *OUT],
    "wrong_input_shape": lambda f: [str(f.checkpoint), "--data", str(f.wrong_shape_npz), *OUT],
    "untraceable": lambda f: [str(f.untraceable), "--arch", "untraceable_helpers:gated_net", *OUT],
    "unsafe_pickle": lambda f: [str(f.pickled), *OUT],
    "missing_model": lambda f: [str(f.checkpoint.with_name("nope.pt")), *OUT],
    "state_dict_without_arch": lambda f: [str(f.state_dict), *OUT],
    "arch_kwargs_invalid_json": lambda f: [str(f.checkpoint), "--arch-kwargs", '{"width": ', *OUT],
    "out_is_a_file": lambda f: [str(f.checkpoint), "--out", str(f.a_file)],
    "out_under_a_file": lambda f: [str(f.checkpoint), "--data", str(f.tiny_npz), "--out", str(f.a_file / "sub")],
}

# What the one error line must mention, per case.
BAD_FRAGMENTS: dict[str, tuple[str, ...]] = {
    "unknown_pass": ("'nope'", "lsq", "observe"),
    "bits_0": ("--bits", "0"),
    "bits_1": ("--bits", "1"),
    "bits_33": ("--bits", "33"),
    "empty_npz": ("0 samples",),
    "wrong_input_shape": ("(3, 5, 5)", "takes samples shaped (C, H, W) with C = 1"),
    "untraceable": ("body.1", "--leaf untraceable_helpers:Gate"),
    "unsafe_pickle": ("--allow-pickle",),
    "missing_model": ("nope.pt", "does not exist"),
    "state_dict_without_arch": ("--arch",),
    "arch_kwargs_invalid_json": ("--arch-kwargs", "JSON"),
    "out_is_a_file": ("--out", "is a file"),
    "out_under_a_file": ("--out",),
}

def _happy_args(f: Files) -> list[str]:
    return [str(f.checkpoint), "--passes", "lsq", "--bits", "4", "--data", "digits", "--train-epochs", "1", *OUT]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return _make_files(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, files: Files) -> dict[str, Run]:
    jobs: dict[str, list[str]] = {
        "happy": _happy_args(files),
        # No --out: saving is covered by the happy path; this checks loading with --allow-pickle.
        "allow_pickle": [str(files.pickled), "--allow-pickle", "--passes", "lsq", "--bits", "3", "--dump-ir", "ir"],
        "emit_int": [str(files.checkpoint), "--passes", "asq,post", "--bits", "4", "--emit", "int", "--verify-int", "--out", "out"],
        "per_channel_joins": [str(files.checkpoint), "--passes", "lsq", "--bits", "8", "--per-channel-joins",
                              "--emit", "int", "--verify-int", "--out", "out"],
        "lookup": [str(files.hardswish), "--arch", "small_models:hardswish_cnn", "--passes", "lsq,lookup-activations",
                   "--bits", "8", "--emit", "int", "--verify-int", "--out", "out"],
        **{name: make(files) for name, make in BAD.items()},
    }
    works = {name: tmp_path_factory.mktemp(name) for name in jobs}
    with ThreadPoolExecutor(max_workers=int(os.environ.get("QC_CLI_JOBS", "2"))) as pool:
        futures = {name: pool.submit(_run_cli, args, works[name]) for name, args in jobs.items()}
        return {name: fut.result() for name, fut in futures.items()}


# --------------------------------------------------------------------------- happy paths


def test_happy_path_prints_table_accuracy_and_dumps(runs: dict[str, Run]) -> None:
    run = runs["happy"]
    out = run.stdout
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    for column in ("kind", "w-bits", "a-bits", "weight quantizer", "act quantizer", "pinned"):
        assert column in header
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("stem_0 ", "stages_", "fc "))}
    assert len(rows) == 22  # 19 3x3 convs (stem + 18), 2 shortcuts, the classifier
    assert rows["stem_0"].split()[1:4] == ["conv2d", "8", "8"] and "reads the network input" in rows["stem_0"]
    assert rows["fc"].split()[1:4] == ["linear", "8", "8"] and "produces the network output" in rows["fc"]
    assert rows["stages_0_conv1"].split()[1:4] == ["conv2d", "4", "4"]
    assert "float accuracy:" in out and "quantized, before QAT:" in out
    assert "quantized, after 1 QAT epoch(s):" in out
    acc = float(out.split("quantized, after 1 QAT epoch(s):")[1].split("%")[0])
    assert 0.0 <= acc <= 100.0
    stems = ["00_input", "01_pin-first-last", "02_observe", "03_lsq", "04_quantize-matmuls", "05_quantize-joins", "06_bias-correction", "07_freeze"]
    assert sorted(p.name for p in run.ir.iterdir()) == sorted(f"{s}.{e}" for s in stems for e in ("txt", "dot"))
    assert "%stages_0_conv1_act = module stages_0_conv1_act(%stem_2)" in (run.ir / "03_lsq.txt").read_text()
    assert "ActQuant(role='input', method='lsq', bits=4" in (run.ir / "03_lsq.txt").read_text()
    # after quantize-joins the first block reads the residual stream's 8-bit codes
    assert "%stages_0_conv1_act = module stages_0_conv1_act(%stem_2_join)" in (run.ir / "05_quantize-joins.txt").read_text()


def test_happy_path_exits_0_and_writes_a_loadable_module(runs: dict[str, Run]) -> None:
    run = runs["happy"]
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in run.out.iterdir()) == ["module.pt", "records.pt", "report.txt", "spec.json"]
    spec = QuantSpec.from_dict(json.loads((run.out / "spec.json").read_text()))
    assert (spec.passes, spec.weight_bits, spec.act_bits, spec.pin_first_last) == (("lsq",), 4, 4, True)
    report = (run.out / "report.txt").read_text()
    assert "stages_0_conv1" in report and "observe" in report
    assert list((run.work / "tmp").iterdir()) == []

    module = torch.load(run.out / "module.pt", weights_only=False)
    data = load_digits()
    with torch.no_grad():
        logits = module(data.x_test[:50])
    assert logits.shape == (50, 10) and torch.isfinite(logits).all()


def test_allow_pickle_loads_the_pickled_module(runs: dict[str, Run]) -> None:
    run = runs["allow_pickle"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("stages_0_conv1 "))
    assert row.split()[1:4] == ["conv2d", "3", "3"]
    assert (run.ir / "03_lsq.txt").is_file()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr[-2000:]
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("qcompile: error: ")
    for fragment in BAD_FRAGMENTS[case]:
        assert fragment in lines[0], (fragment, lines[0])
    assert not run.out.exists() and not run.ir.exists()
    for flag in ("--out", "--dump-ir"):
        target = Path(run.args[run.args.index(flag) + 1]) if flag in run.args else None
        if target is not None and target.is_absolute():  # the "file" cases: the file is left alone
            assert target.is_file() or (target.parent.is_file() and not target.exists())


def test_bad_cases_have_fragments() -> None:
    assert set(BAD) == set(BAD_FRAGMENTS)


def test_failed_compile_leaves_no_temporary_folder(runs: dict[str, Run]) -> None:
    run = runs["unknown_pass"]  # fails inside compile(), after the temporary dump folder was made
    assert run.returncode == 2
    assert list((run.work / "tmp").iterdir()) == []


def test_existing_folder_with_user_files_is_not_wiped(
    files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qcompiler.cli import main

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious\n")
    monkeypatch.chdir(tmp_path)
    code = main([str(files.checkpoint), "--data", str(files.tiny_npz), "--dump-ir", str(keep), "--quiet"])
    capsys.readouterr()
    # Refusing (exit 2) or writing beside the file are both fine; deleting it is not.
    assert code in (0, 2)
    assert (keep / "notes.txt").read_text() == "precious\n"


def test_emit_int_writes_a_program_that_agrees_with_the_module(runs: dict[str, Run], files: Files, tmp_path: Path) -> None:
    from qcompiler import Compiled
    from qcompiler.runtime.program import Program
    from qcompiler.runtime.run import main as run_main

    run = runs["emit_int"]
    assert run.returncode == 0, run.stderr
    assert "Integer program (costs per test sample):" in run.stdout and "energy ratio" in run.stdout
    agree = float(run.stdout.split("classes agree ")[1].split(";")[0])
    assert agree >= 0.995, run.stdout
    assert (run.out / "program.npz").is_file() and "program.npz" in run.stdout
    # The saved program reloads and computes the saved module's classes (deployed: eval mode
    # without autograd, whose integer bias the program shares); qcompile-run prints them.
    x = load_digits().x_test[:16]
    program = Program.load(run.out / "program.npz")
    module = Compiled.load(run.out, trust=True).module
    with torch.no_grad():
        expected = module(x).argmax(1).tolist()
    assert program.run(x.numpy()).argmax(1).tolist() == expected
    np.savez(tmp_path / "in.npz", x=x.numpy())
    assert run_main([str(run.out / "program.npz"), str(tmp_path / "in.npz"), "--out", str(tmp_path / "logits.npz")]) == 0
    with np.load(tmp_path / "logits.npz") as z:
        assert z["logits"].argmax(1).tolist() == expected


def test_per_channel_joins_flag_compiles_lowers_and_says_so(runs: dict[str, Run]) -> None:
    run = runs["per_channel_joins"]
    assert run.returncode == 0, run.stderr
    assert "operand(s) with one step per channel" in run.stdout, run.stdout
    agree = float(run.stdout.split("classes agree ")[1].split(";")[0])
    assert agree >= 0.995, run.stdout
    assert (run.out / "program.npz").is_file()


def test_lookup_activations_lower_hardswish_and_silu_by_table(runs: dict[str, Run]) -> None:
    run = runs["lookup"]
    assert run.returncode == 0, run.stderr
    assert "lookup-activations" in run.stdout and "lut" in run.stdout, run.stdout
    agree = float(run.stdout.split("classes agree ")[1].split(";")[0])
    assert agree >= 0.995, run.stdout
    assert (run.out / "program.npz").is_file()


def test_qcompile_run_bad_inputs_are_one_line(runs: dict[str, Run], tmp_path: Path, capsys) -> None:
    from qcompiler.runtime.run import main as run_main

    program = runs["emit_int"].out / "program.npz"
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(program.read_bytes()[:2000])
    np.savez(tmp_path / "in.npz", y=np.zeros(3))
    cases = {
        "missing input": ([str(program), str(tmp_path / "none.npz")], "does not exist"),
        "wrong key": ([str(program), str(tmp_path / "in.npz")], "has no array 'x'"),
        "truncated program": ([str(truncated), str(tmp_path / "in.npz")], "not a valid integer program"),
    }
    for name, (argv, fragment) in cases.items():
        assert run_main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qcompile-run: error:") and fragment in err[0], (name, err)
    assert not (tmp_path / "logits.npz").exists()


def test_init_flag_sets_the_spec_and_rejects_unknown_values() -> None:
    from qcompiler.cli import _spec_from_args, build_parser

    parser = build_parser()
    assert _spec_from_args(parser.parse_args(["m.pt"])).init == "mse"
    assert _spec_from_args(parser.parse_args(["m.pt", "--init", "lsq"])).init == "lsq"
    with pytest.raises(SystemExit):
        parser.parse_args(["m.pt", "--init", "minmax"])
