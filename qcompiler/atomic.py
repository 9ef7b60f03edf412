"""Atomic outputs: everything is written into a staging folder beside its destination, then renamed.

A rename within one file system is atomic, so a reader (or a crash, or a full disk)
never sees a half-written output: there is the old folder or the new one.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> dst = Path(tempfile.mkdtemp()) / "out"
    >>> tmp = stage_dir(dst)
    >>> tmp.parent == dst.parent, tmp.name.startswith(".out.")
    (True, True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def stage_dir(dst: Path) -> Path:
    """An empty folder beside ``dst`` to build it in, with the permissions a plain ``mkdir`` would give.

    ``mkdtemp`` makes its folder private (0700), which the final rename would carry
    over to the user's output; the umask decides instead.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file beside ``path`` to write; on success it replaces ``path``.

    Its permissions are those a plain ``open`` would give (``mkstemp`` makes the file
    private, 0600, which the rename would carry over). On a failure the file is removed
    and ``path`` is untouched.

    >>> import tempfile
    >>> from pathlib import Path
    >>> dst = Path(tempfile.mkdtemp()) / "a.bin"
    >>> with staged_file(dst) as f:
    ...     _ = f.write(b"ok")
    >>> dst.read_bytes()
    b'ok'
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``out`` to write into; on success it replaces ``out``.

    On a failure the staging folder is removed and ``out`` is untouched, so a crash
    or a full disk never leaves a half-written output.
    """
    tmp = stage_dir(out)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
