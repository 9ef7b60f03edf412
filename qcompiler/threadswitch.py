"""A switch that ``off()`` blocks turn off in the calling thread only.

The fused kernels and the backward recomputation can each be turned off for a block of
code (comparisons, debugging) without touching what other threads do.

Example:
    >>> s = ThreadSwitch()
    >>> with s.off():
    ...     s.is_off()
    True
    >>> s.is_off()
    False
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ThreadSwitch:
    def __init__(self) -> None:
        self._local = threading.local()  # nesting depth of off() blocks, per thread

    def is_off(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
