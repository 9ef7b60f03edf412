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
from pathlib import Path


def stage_dir(dst: Path) -> Path:
    """An empty folder beside ``dst`` to build it in, with the permissions a plain ``mkdir`` would give.

    ``mkdtemp`` makes its folder private (0700), which the final rename would carry
    over to the user's output; the umask decides instead.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


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
