"""Atomic outputs: staged beside the destination, moved into place, with the umask's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qcompiler.atomic import staged_file, staged_folder


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_staged_file_gets_the_permissions_a_plain_open_would(tmp_path, umask_022):
    """mkstemp makes its file 0600; a program, ONNX file or logits file must not stay private."""
    dst = tmp_path / "sub" / "out.bin"
    with staged_file(dst) as f:
        f.write(b"data")
    assert dst.read_bytes() == b"data" and _mode(dst) == 0o644
    assert [p.name for p in dst.parent.iterdir()] == ["out.bin"]


def test_a_failed_staged_file_leaves_the_old_one_and_no_temporary(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with staged_file(dst) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert dst.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_staged_folder_gets_the_permissions_a_plain_mkdir_would(tmp_path, umask_022):
    out = tmp_path / "run"
    with staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (out / "a.txt").read_text() == "x" and _mode(out) == 0o755


def test_program_and_onnx_files_are_not_private(tmp_path, umask_022):
    import torch

    import qcompiler
    from qcompiler.zoo import plain_cnn

    torch.manual_seed(0)
    c = qcompiler.compile(plain_cnn(width=4).eval(), qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(16, 1, 8, 8))
    for path in (c.lower().save(tmp_path / "p.npz"), c.export_onnx(tmp_path / "m.onnx")):
        assert _mode(path) == 0o644, path
