"""``Program``: an integer program, its constant tables, and its file format.

A program is a list of :class:`~.isa.Instr` over named buffers, the named constant
arrays they read, the input and output buffer names, and metadata (the
activation quantizers whose codes it computes, in order). ``save`` writes one
``.npz`` file: every constant as a plain array plus the instructions as JSON text,
with a SHA-256 digest over both; ``load`` reads it with ``allow_pickle=False`` and
refuses a truncated or edited file with one :class:`ProgramFileError` line.

Example:
    >>> import numpy as np, tempfile, os
    >>> from qcompiler.runtime.isa import Instr
    >>> p = Program([Instr("relu", "y", ("x",))], {}, ("x",), ("y",), {})
    >>> p.run(np.array([[-2, 3]])).tolist()
    [[0, 3]]
    >>> path = p.save(os.path.join(tempfile.mkdtemp(), "relu.npz"))
    >>> Program.load(path).run(np.array([[-2, 3]])).tolist()
    [[0, 3]]
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import staged_file
from ..errors import QCompileError
from .isa import ISA, Instr

FORMAT = "qcompiler-integer-program/1"
_JSON_KEY = "__program__"


class ProgramFileError(QCompileError):
    """An integer program file is missing, truncated, edited or of another format."""


@dataclass
class Program:
    """Instructions over named integer buffers plus constant tables (see :mod:`.isa`)."""

    instructions: list[Instr]
    consts: dict[str, np.ndarray]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run on a batch ``x`` (NumPy, batch first); returns the output buffer."""
        from .interpreter import Interpreter

        return Interpreter(self).run(x)[0]

    def trace(self, x: np.ndarray, keep: tuple[str, ...] = (), on_overflow: str = "raise", force=None):
        """``(output, {name: buffer} for keep, overflows)``: a run that keeps intermediate buffers
        (and replaces the buffers in ``force`` by the given values once computed)."""
        from .interpreter import Interpreter

        it = Interpreter(self, on_overflow=on_overflow)
        out, kept = it.run(x, keep, force)
        return out, kept, it.overflows

    def verify(self, compiled, x):
        """Agreement with the fake-quant module run in float64 (see :mod:`.agreement`)."""
        from .agreement import verify_program

        return verify_program(self, compiled, x)

    def costs(self, x: np.ndarray):
        """Per-layer and total operation counts, memory traffic and energy (see :mod:`.cost`)."""
        from .cost import costs

        return costs(self, x)

    # ------------------------------------------------------------------ files

    def _document(self) -> dict[str, Any]:
        return {"format": FORMAT, "inputs": list(self.inputs), "outputs": list(self.outputs), "meta": self.meta,
                "instructions": [i.to_json() for i in self.instructions]}

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (a ``.npz``): constants as arrays, instructions as JSON, and their digest."""
        path = Path(path)
        if any(k.startswith("__") for k in self.consts):
            raise ValueError("constant names starting with '__' are reserved")
        doc = self._document()
        doc["digest"] = _digest(doc, self.consts)
        text = json.dumps(doc, sort_keys=True).encode()
        # staged beside the destination and moved into place: never a half-written program
        with staged_file(path) as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, **self.consts, **{_JSON_KEY: np.frombuffer(text, dtype=np.uint8)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Program:
        """Read a program written by :meth:`save`; anything else raises :class:`ProgramFileError`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            doc = json.loads(arrays.pop(_JSON_KEY).tobytes().decode())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
            digest = doc.pop("digest")
            if digest != _digest(doc, arrays):
                raise ValueError("digest mismatch: the file was edited or corrupted")
            program = cls([Instr.from_json(i) for i in doc["instructions"]], arrays,
                          tuple(doc["inputs"]), tuple(doc["outputs"]), doc["meta"])
            program.check()
        except FileNotFoundError:
            raise ProgramFileError(f"integer program {str(path)!r} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            raise ProgramFileError(f"{str(path)!r} is not a valid integer program ({type(e).__name__}: {e}); "
                                   "lower and save the model again") from None
        return program

    def check(self) -> None:
        """Every op is declared, every constant exists, every buffer is written before it is read."""
        live = set(self.inputs)
        for i, ins in enumerate(self.instructions):
            if ins.op not in ISA:
                raise ValueError(f"instruction {i} has unknown op {ins.op!r}")
            missing = [c for c in ins.consts if c not in self.consts]
            if missing:
                raise ValueError(f"instruction {i} ({ins.op}) reads missing constant {missing[0]!r}")
            unread = [s for s in ins.srcs if s not in live]
            if unread:
                raise ValueError(f"instruction {i} ({ins.op}) reads buffer {unread[0]!r} before it is written")
            live.add(ins.dst)
        if not set(self.outputs) <= live:
            raise ValueError("the program never writes its outputs")


def _digest(doc: dict[str, Any], consts: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
    for name in sorted(consts):
        a = np.ascontiguousarray(consts[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


__all__ = ["FORMAT", "Program", "ProgramFileError"]
