"""``qcompile-run``: run a saved integer program on inputs from a ``.npz`` file.

    qcompile-run runs/m/program.npz inputs.npz                 # prints each sample's class
    qcompile-run runs/m/program.npz inputs.npz --out logits.npz  # writes the outputs as ``logits``

The input file holds the batch as array ``x`` (or ``--key NAME``), shaped as the model
expects (batch first). Bad input is one line on stderr and exit status 2; the output
file is written atomically. No code from either file is ever run: programs load
with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import staged_file
from ..errors import DataError, QCompileError
from .program import Program


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile-run", description="Run a saved integer program on a .npz batch.")
    p.add_argument("program", help="program.npz written by qcompile --emit int (or Program.save)")
    p.add_argument("inputs", help=".npz file holding the input batch")
    p.add_argument("--key", default="x", help="name of the input array in the .npz (default: x)")
    p.add_argument("--out", help="write the outputs to this .npz (array 'logits') instead of printing classes")
    return p


def load_batch(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{path!r} has no array {key!r} (it has {', '.join(z.files) or 'none'}); give --key")
            return np.asarray(z[key], dtype=np.float64)
    except FileNotFoundError:
        raise DataError(f"input file {path!r} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path!r} is not a readable .npz file ({e})") from None


def _write_atomically(path: Path, logits: np.ndarray) -> None:
    with staged_file(path) as f:
        np.savez(f, logits=logits)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        program = Program.load(args.program)
        x = load_batch(args.inputs, args.key)
        try:
            logits = program.run(x)
        except (ValueError, IndexError) as e:
            raise DataError(f"input of shape {x.shape} does not fit the program ({e})") from None
        if args.out:
            _write_atomically(Path(args.out), logits)
            print(f"wrote {args.out} (logits, shape {logits.shape})")
        else:
            for i, c in enumerate(np.asarray(logits).argmax(axis=-1).tolist()):
                print(f"{i}\t{c}")
    except QCompileError as e:
        print(f"qcompile-run: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
