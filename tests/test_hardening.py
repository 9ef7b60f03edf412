"""Bad and hostile input, case by case: one line naming the problem and the fix, no traceback,
no partial output, the input untouched, no code run without opt-in.

Each CLI case runs ``qcompiler.cli.main`` in this process (a subprocess per case would cost
~3 s of imports each; ``tests/test_cli.py`` covers the subprocess path). Every case name
here is a row of ``docs/bad-inputs.md``; a test keeps the two in step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.cli import main
from qcompiler.errors import QCompileError, SpecError
from qcompiler.modelio import save_checkpoint
from qcompiler.spec import QuantSpec
from qcompiler.zoo import plain_cnn

DOC = Path(__file__).parent.parent / "docs" / "bad-inputs.md"
ARCH, KW = "qcompiler.zoo:plain_cnn", {"width": 4}


@dataclass(frozen=True)
class Inputs:
    root: Path

    def __getattr__(self, name: str) -> Path:  # inputs by name: self.model -> root/model.pt, ...
        return self.root / FILES[name]


FILES = {
    "model": "model.pt", "state": "state.pt", "evil": "evil.pt", "nan": "nan.pt", "truncated": "truncated.pt",
    "wide": "wide_state.pt", "labels": "labels12.npz", "huge": "huge.npz", "tiny": "data/tiny.npz", "spec": "specs/spec.json",
}


def _make_inputs(root: Path) -> Inputs:
    torch.manual_seed(0)
    model = plain_cnn(**KW)
    f = Inputs(root)
    (root / "data").mkdir()
    (root / "specs").mkdir()
    save_checkpoint(model, f.model, ARCH, KW)
    torch.save(model.state_dict(), f.state)
    torch.save(plain_cnn(width=8).state_dict(), f.wide)
    # Valid for weights_only loading, yet naming a function that would run a shell command.
    torch.save({"format": "qcompiler-checkpoint-1", "arch": "os:system",
                "arch_kwargs": {"command": f"touch {root / 'PWNED'}"}, "state_dict": {}}, f.evil)
    broken = plain_cnn(**KW)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("inf")
    save_checkpoint(broken, f.nan, ARCH, KW)
    f.truncated.write_bytes(f.model.read_bytes()[:3000])
    rng = np.random.default_rng(0)
    np.savez(f.labels, x=rng.normal(size=(32, 1, 8, 8)).astype(np.float32), y=np.arange(32) % 12)
    np.savez(f.huge, x=(rng.normal(size=(64, 1, 8, 8)) * 1e30).astype(np.float32), y=np.arange(64) % 10)
    np.savez(f.tiny, x=rng.normal(size=(32, 1, 8, 8)).astype(np.float32), y=np.arange(32) % 10)
    f.spec.write_text(json.dumps({"passes": ["lsq"]}))
    (root / "link_target").mkdir()
    (root / "link").symlink_to(root / "link_target")
    return f


def _spec_file(root: Path, body: dict) -> str:
    path = root / f"spec_{hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]}.json"
    path.write_text(json.dumps(body))
    return str(path)


# name -> (argv from the inputs, fragments the one error line must hold). The working
# directory is a fresh folder holding nothing; "out" and "ir" are the default outputs.
CliCase = tuple[Callable[[Inputs], list[str]], tuple[str, ...]]
CLI: dict[str, CliCase] = {
    # security and data safety
    "checkpoint_names_foreign_factory": (lambda f: [str(f.evil), "--out", "out"], ("os:system", "--arch os:system")),
    "out_holds_the_model": (lambda f: [str(f.model), "--out", str(f.root)], ("holds the model",)),
    "out_is_the_model_file": (lambda f: [str(f.model), "--out", str(f.model)], ("--out", "is a file")),
    "dump_ir_holds_the_data": (lambda f: [str(f.model), "--data", str(f.tiny), "--dump-ir", str(f.tiny.parent)], ("--dump-ir", "holds the data")),
    "out_holds_the_spec": (lambda f: [str(f.model), "--spec", str(f.spec), "--out", str(f.spec.parent)], ("holds the spec",)),
    "out_inside_dump_ir": (lambda f: [str(f.model), "--out", "ir/out", "--dump-ir", "ir"], ("overlap",)),
    "dump_ir_inside_out": (lambda f: [str(f.model), "--out", "out", "--dump-ir", "out/ir"], ("overlap",)),
    "out_equals_dump_ir": (lambda f: [str(f.model), "--out", "same", "--dump-ir", "same"], ("overlap",)),
    "empty_out": (lambda f: [str(f.model), "--out", ""], ("--out is an empty path",)),
    "empty_dump_ir": (lambda f: [str(f.model), "--dump-ir", " "], ("--dump-ir is an empty path",)),
    "empty_model": (lambda f: ["", "--out", "out"], ("MODEL is an empty path",)),
    "out_is_a_symlink": (lambda f: [str(f.model), "--out", str(f.root / "link")], ("symbolic link",)),
    "lr_nan": (lambda f: [str(f.model), "--lr", "nan", "--train-epochs", "1", "--out", "out"], ("--lr", "nan")),
    "lr_negative": (lambda f: [str(f.model), "--lr", "-0.1", "--train-epochs", "1"], ("--lr",)),
    "batch_size_zero": (lambda f: [str(f.model), "--batch-size", "0", "--train-epochs", "1"], ("--batch-size",)),
    "train_epochs_negative": (lambda f: [str(f.model), "--train-epochs", "-1"], ("--train-epochs",)),
    "huge_inputs_diverge": (lambda f: [str(f.model), "--data", str(f.huge), "--train-epochs", "1", "--out", "out"],
                            ("NaN or infinite", "nothing was saved")),
    "labels_beyond_outputs": (lambda f: [str(f.model), "--data", str(f.labels), "--out", "out"], ("labels up to 11", "10 outputs")),
    "spec_passes_number": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"passes": 5})], ("passes must be a list",)),
    "spec_passes_null": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"passes": None})], ("passes must be a list",)),
    "spec_seed_text": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"seed": "x"})], ("seed must be",)),
    "spec_seed_fraction": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"seed": 1.5})], ("seed must be",)),
    "spec_alpha_text": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"outlier_alpha": "abc"})], ("outlier_alpha",)),
    "spec_calib_batches_bool": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"calib_batches": True})], ("calib_batches",)),
    "spec_leaf_modules_string": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"leaf_modules": "abc"})], ("leaf_modules",)),
    "spec_overrides_null": (lambda f: [str(f.model), "--spec", _spec_file(f.root, {"overrides": None})], ("overrides must be a list",)),
    # clearer messages
    "model_is_a_directory": (lambda f: [str(f.root), "--out", "out"], ("is a directory",)),
    "truncated_checkpoint": (lambda f: [str(f.truncated), "--out", "out"], ("truncated or corrupt",)),
    "weights_do_not_fit_arch": (lambda f: [str(f.wide), "--arch", ARCH, "--arch-kwargs", json.dumps(KW)],
                                ("shape", "in the file", "--arch")),
    "non_finite_weights": (lambda f: [str(f.nan), "--out", "out"], ("'fc.weight'", "NaN or infinite")),
    "adder_pass_without_adder_layers": (lambda f: [str(f.model), "--passes", "outlier-clamp,adder-groups"], ("AdderConv2d", "--force")),
    "no_pin_with_pin_pass": (lambda f: [str(f.model), "--no-pin", "--passes", "pin-first-last,lsq"], ("--no-pin",)),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return _make_inputs(tmp_path_factory.mktemp("inputs"))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _run(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.chdir(cwd)
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", CLI)
def test_cli_bad_input(case: str, inputs: Inputs, tmp_path: Path, monkeypatch, capsys) -> None:
    make_args, fragments = CLI[case]
    argv = make_args(inputs)  # may write a spec file into the inputs folder: snapshot after
    before = _snapshot(inputs.root)
    code, err = _run(argv, tmp_path, monkeypatch, capsys)
    errors = [line for line in err if not line.startswith("qcompile: warning:")]
    assert code == 2, err
    assert len(errors) == 1 and errors[0].startswith("qcompile: error: "), err
    assert "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
    assert _snapshot(inputs.root) == before, "inputs must be untouched"
    assert not (inputs.root / "PWNED").exists(), "code named in the file ran"
    assert not any(p.name.startswith(".") for p in inputs.root.iterdir()), "a staging folder was left behind"


def test_every_case_is_a_row_of_the_docs_table() -> None:
    from test_cli import BAD

    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", DOC.read_text(), re.M))
    assert rows == set(CLI) | set(API) | set(BAD) | set(OTHER), sorted(rows ^ (set(CLI) | set(API) | set(BAD) | set(OTHER)))


# --------------------------------------------------------------------------- cases needing more than argv

# Tested below by their own functions; listed so the docs table covers them too.
OTHER = ("disk_full_out", "disk_full_dump_ir", "internal_error", "replacing_earlier_output")


def _fail_writes_under(folder_name: str, monkeypatch) -> None:
    """Simulate a full disk for any file written under a folder called ``folder_name`` or its staging copy."""
    real_write_text, real_save = Path.write_text, torch.save

    def full(path) -> bool:
        return any(part == folder_name or part.startswith(f".{folder_name}.") for part in Path(path).parts)

    def write_text(self, *a, **kw):
        if full(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *a, **kw)

    def save(obj, f, *a, **kw):
        if isinstance(f, (str, Path)) and full(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("flag,case", [("--out", "disk_full_out"), ("--dump-ir", "disk_full_dump_ir")])
def test_full_disk_is_one_line_and_leaves_nothing(flag: str, case: str, inputs: Inputs, tmp_path: Path, monkeypatch, capsys) -> None:
    target = "out" if flag == "--out" else "ir"
    _fail_writes_under(target, monkeypatch)
    code, err = _run([str(inputs.model), flag, target], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("qcompile: error: cannot read or write") and "No space left" in err[0]
    assert list(tmp_path.iterdir()) == [], "no partial output or staging folder"


def test_an_internal_error_is_one_line_exit_1(inputs: Inputs, tmp_path: Path, monkeypatch, capsys) -> None:
    import qcompiler.report

    def broken(*a, **kw):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(qcompiler.report.CompileReport, "text", broken)
    code, err = _run([str(inputs.model), "--out", "out"], tmp_path, monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0] == "qcompile: internal error: ZeroDivisionError: division by zero; rerun with --debug for the traceback and report it"
    assert list(tmp_path.iterdir()) == []


def test_replacing_an_earlier_output_says_so(inputs: Inputs, tmp_path: Path, monkeypatch, capsys) -> None:
    argv = [str(inputs.model), "--out", "out", "--dump-ir", "ir"]
    assert _run(argv, tmp_path, monkeypatch, capsys)[0] == 0
    first = (tmp_path / "out" / "spec.json").stat().st_mtime_ns
    code, err = _run(argv, tmp_path, monkeypatch, capsys)
    assert code == 0
    assert any("--out 'out' holds an earlier run's output; it will be replaced" in line for line in err), err
    assert any("--dump-ir 'ir' holds an earlier run's output" in line for line in err), err
    assert (tmp_path / "out" / "spec.json").stat().st_mtime_ns >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ir", "out"]  # no staging folder left


def test_header_states_only_what_was_applied(inputs: Inputs, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([str(inputs.model), "--bits", "3", "--quiet"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("passes: "))
    assert header == "passes: lsq; W3A3; first/last at W8A8"


# --------------------------------------------------------------------------- API cases

def _api_compiled_load_untrusted(tmp: Path) -> None:
    qcompiler.Compiled.load(tmp)


def _api_compiled_load_corrupt(tmp: Path) -> None:
    c = qcompiler.compile(plain_cnn(**KW), calib_data=torch.randn(8, 1, 8, 8))
    c.save(tmp / "out")
    (tmp / "out" / "records.pt").write_bytes(b"not a pickle")
    qcompiler.Compiled.load(tmp / "out", trust=True)


def _api_spec_is_a_dict(tmp: Path) -> None:
    qcompiler.compile(plain_cnn(**KW), {"passes": "lsq"}, calib_data=torch.randn(8, 1, 8, 8))


def _api_mixed_shape_batches(tmp: Path) -> None:
    qcompiler.compile(plain_cnn(**KW), calib_data=[torch.randn(4, 1, 8, 8), torch.randn(4, 1, 6, 6)])


def _api_input_dtype_mismatch(tmp: Path) -> None:
    qcompiler.compile(plain_cnn(**KW), calib_data=torch.randn(8, 1, 8, 8, dtype=torch.float64))


def _api_non_finite_model(tmp: Path) -> None:
    m = plain_cnn(**KW)
    with torch.no_grad():
        m.fc.bias[1] = float("nan")
    qcompiler.compile(m, calib_data=torch.randn(8, 1, 8, 8))


def _api_train_config_lr_nan(tmp: Path) -> None:
    from qcompiler.train import TrainConfig

    TrainConfig(lr=float("nan"))


def _api_override_pattern_not_text(tmp: Path) -> None:
    QuantSpec.from_dict({"overrides": [{"pattern": 3, "weight_bits": 8}]})


def _api_leaf_modules_on_a_graph_module(tmp: Path) -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()))
    qcompiler.compile(gm, QuantSpec(passes="lsq", leaf_modules=["torch.nn.ReLU"]), calib_data=torch.randn(8, 1, 6, 6))


API: dict[str, tuple[Callable[[Path], None], type[Exception], tuple[str, ...]]] = {
    "compiled_load_untrusted": (_api_compiled_load_untrusted, QCompileError, ("trust=True", "runs code")),
    "compiled_load_corrupt": (_api_compiled_load_corrupt, QCompileError, ("records.pt", "truncated or corrupt")),
    "spec_is_a_dict": (_api_spec_is_a_dict, SpecError, ("QuantSpec.from_dict",)),
    "mixed_shape_calibration_batches": (_api_mixed_shape_batches, qcompiler.errors.DataError, ("batch 2", "(1, 6, 6)")),
    "input_dtype_mismatch": (_api_input_dtype_mismatch, qcompiler.errors.DataError, ("dtype float64", "float32 weights")),
    "non_finite_model": (_api_non_finite_model, QCompileError, ("'fc.bias'", "NaN or infinite")),
    "train_config_lr_nan": (_api_train_config_lr_nan, SpecError, ("lr must be a finite positive number",)),
    "override_pattern_not_text": (_api_override_pattern_not_text, SpecError, ("pattern",)),
    "leaf_modules_on_a_graph_module": (_api_leaf_modules_on_a_graph_module, SpecError, ("already a torch.fx.GraphModule", "pass the nn.Module")),
}


@pytest.mark.parametrize("case", API)
def test_api_bad_input(case: str, tmp_path: Path) -> None:
    call, kind, fragments = API[case]
    with pytest.raises(kind) as info:
        call(tmp_path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
