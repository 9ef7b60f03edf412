"""The header every benchmark writes at the top of its results file: how to reproduce it, and where it ran.

A number is only comparable with one from the same machine, so each results file
names the command, the date, the git commit, the CPU model, the instruction set
torch dispatches to (``torch.backends.cpu.get_cpu_capability()``) and the one oneDNN's
convolutions use, the cores and torch's intra-op thread count.

    >>> text = header("python bench/x.py", threads=2)
    >>> lines = text.splitlines()
    >>> lines[0].startswith("Command: `python bench/x.py`")
    True
    >>> "instruction set" in text and "torch threads 2" in text
    True
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        # results files do not count: a second run appending to one (--append) would call the code changed
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this script, as typed from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, argv[1:])])


def header(cmd: str | None = None, threads: int | None = None) -> str:
    """Markdown lines: command, date and commit; machine (CPU model, instruction set, cores, threads)."""
    threads = torch.get_num_threads() if threads is None else threads
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Command: `{cmd or command()}` ({date}, commit {commit()})\n\n"
        f"Machine: {cpu_model()}, instruction set {instruction_set()}, "
        f"{os.cpu_count()} cores, torch threads {threads}, torch {torch.__version__}, Python {platform.python_version()}"
        f"{load_average()}\n"
    )


# What an AVX2 machine runs, on an AVX-512 one. Each library picks its vector instruction
# set on its own: ATen's kernels (and ours, built for what ATen dispatches to) by
# ATEN_CPU_CAPABILITY, oneDNN's convolutions by ONEDNN_MAX_CPU_ISA, MKL's matrix products by
# MKL_ENABLE_INSTRUCTIONS. Narrowing ATen alone times AVX-512 convolutions next to AVX2
# elementwise code, a machine that does not exist.
NARROWED = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def narrowed(isa: str, script: str | Path, argv: list[str]) -> int | None:
    """Run ``script argv`` again in a child process with every library limited to ``isa``
    (see ``NARROWED``) and return its exit status; ``None`` when this process already is.

    The variables must be set before the libraries first dispatch, so a fresh interpreter runs it.
    """
    env = NARROWED[isa]
    if all(os.environ.get(k) == v for k, v in env.items()):
        return None
    return subprocess.run([sys.executable, str(script), *argv], env={**os.environ, **env}).returncode


def onednn_isa() -> str | None:
    """The instruction set oneDNN's convolutions use in this environment, from its verbose log
    (a child process runs one convolution), or ``None`` where it does not say."""
    probe = ("import torch\nwith torch.no_grad():\n"
             "    torch.nn.functional.conv2d(torch.ones(16, 64, 16, 16), torch.ones(64, 64, 3, 3))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "ONEDNN_VERBOSE": "1"},
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split("isa:", 1)[1].strip() for line in out.splitlines() if ",info,cpu,isa:" in line), None)


def instruction_set() -> str:
    """The vector instruction set torch dispatches to (and the fused kernels are built for), with
    oneDNN's for convolutions, noting the variables that narrowed them (``NARROWED``): an
    AVX-512 CPU then runs the code an AVX2 machine would."""
    isa = torch.backends.cpu.get_cpu_capability()
    forced = [f"{k}={os.environ[k]}" for k in NARROWED["avx2"] if k in os.environ]
    parts = [f"oneDNN: {onednn_isa() or 'not reported'}"]
    if forced:
        parts.append("set by " + ", ".join(forced))
    return f"{isa} ({'; '.join(parts)})"


def load_average() -> str:
    """``; load average 1.2`` (the 1-minute average when the file is written): a shared machine's timings depend on it."""
    try:
        return f"; load average {os.getloadavg()[0]:.1f} when written"
    except (AttributeError, OSError):
        return ""


def write(path: str | Path, title: str, body: str, cmd: str | None = None, threads: int | None = None) -> None:
    """``# title``, the header, then ``body``, to ``path``."""
    Path(path).write_text(f"# {title}\n\n{header(cmd, threads)}\n{body.rstrip()}\n")
