"""Fused CPU kernels for QAT fake quantization, built on first use.

The quantizers in :mod:`qcompiler.quantizers` are written in eager PyTorch, which
needs ~7 passes over a tensor for a uniform quantizer and ~16 for a POST/POT grid
(divide, abs, exponent, comparisons, clamp, level, sign, multiply, and again in the
backward pass). On ResNet-18's 11 M weights that alone costs a third of a float
training step. ``fused_quant.cpp`` does each quantizer in one pass forward and one
backward, with the same numerics (the forward pass bit for bit; tests check it).

The extension is compiled with the C++ compiler that PyTorch's
``torch.utils.cpp_extension`` finds (once per source version, ~40 s, cached under
``$QCOMPILER_CACHE`` or ``~/.cache/qcompiler``). Everything works without it: when
there is no compiler, or ``QCOMPILER_FUSED=0`` is set, or a tensor is not a
contiguous float32 CPU tensor, the eager code runs instead.

Example:
    >>> from qcompiler import kernels
    >>> k = kernels.fused()   # the extension, or None where it cannot be built
    >>> k is None or hasattr(k, "lsq_forward")
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..threadswitch import ThreadSwitch
from ..tracing import capturing

SOURCE = Path(__file__).with_name("fused_quant.cpp")
# -fopenmp: at::parallel_for is OpenMP pragmas in ATen's headers, so without it the
# kernels run on one thread. The extension then needs libgomp.so.1, which resolves to
# the copy PyTorch has already loaded, so there is one OpenMP runtime in the process.
# -ffp-contract=off: no fused multiply-adds, so results match the eager ops exactly.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
# Wider vectors where PyTorch itself found them (~1.6x on the weight kernels with AVX2);
# the capability is part of the cache key, so a build never runs on a CPU without them.
# On AVX-512 machines PyTorch's own float kernels use 512-bit vectors, so ours must too
# or the QAT step's ratio to float grows (1.42x measured with the AVX2 build there).
# The selects are bit masks and -ffp-contract=off holds, so every width computes the
# same bits (tests/kernels compare against the eager quantizers).
ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"],
}
LDFLAGS = ["-fopenmp"]

_state: dict[str, ModuleType | None] = {}
_switch = ThreadSwitch()  # disabled() blocks, per thread


def enabled() -> bool:
    """Whether the fused path may be used: ``QCOMPILER_FUSED`` is not ``0`` and no :func:`disabled` block is active."""
    if _switch.is_off():
        return False
    return os.environ.get("QCOMPILER_FUSED", "1") != "0"


def disabled() -> contextlib.AbstractContextManager:
    """Run the eager quantizers inside this block, in this thread (for comparisons and debugging)."""
    return _switch.off()


def _cflags() -> list[str]:
    return CFLAGS + ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def _build_dir() -> tuple[str, Path]:
    key = " ".join(_cflags() + LDFLAGS + [torch.__version__]).encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + key)
    name = f"qcompiler_fused_{digest.hexdigest()[:12]}"
    root = Path(os.environ.get("QCOMPILER_CACHE", Path.home() / ".cache" / "qcompiler"))
    return name, root / name


def _load() -> ModuleType | None:
    from torch.utils import cpp_extension

    name, build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):
        print("qcompiler: compiling the fused quantizer kernels (first use only, ~1 min)", file=sys.stderr)
    # Build from a copy inside the cache entry: ninja rebuilds whenever the source's
    # path changes, so two checkouts sharing the cache would otherwise rebuild in turn.
    source = build_dir / SOURCE.name
    if not source.exists() or source.read_bytes() != SOURCE.read_bytes():
        shutil.copyfile(SOURCE, source)
    try:
        return cpp_extension.load(
            name, [str(source)], extra_cflags=_cflags(), extra_ldflags=LDFLAGS, build_directory=str(build_dir)
        )
    except Exception as exc:  # no compiler, no ninja, headers missing: all mean "use eager"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warnings.warn(
            f"qcompiler: fused quantizer kernels unavailable ({first_line}); using the slower eager quantizers",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def fused() -> ModuleType | None:
    """The compiled kernel module, or ``None`` (disabled, or it could not be built)."""
    if not enabled():
        return None
    if "module" not in _state:
        _state["module"] = _load()
    return _state["module"]


def _one_per_row(x: torch.Tensor, step: torch.Tensor) -> bool:
    return step.dim() == x.dim() and step.shape[0] == x.shape[0] == step.numel()


def built() -> bool:
    """Whether the kernels are loaded in this process or built in the cache (so :func:`fused` starts no build)."""
    if "module" in _state:
        return _state["module"] is not None
    name, build_dir = _build_dir()
    return enabled() and any(build_dir.glob(f"{name}*.so"))


def usable(x: torch.Tensor, step: torch.Tensor, build: bool = True, per_row: bool = False) -> ModuleType | None:
    """The kernel module if it can quantize ``x`` with ``step`` (one step per row of ``x``), else ``None``.

    The kernels take float32 CPU tensors whose step is one scalar or one value per
    index of dim 0 (per-sample ASQ steps, per-output-channel weight steps), and they
    stay out of tracing, export and ``torch.compile``, which need the eager ops.
    ``per_row``: ``step`` is a flat vector, one value per index of dim 0 (a weight's
    per-channel steps as stored), rather than shaped to broadcast over ``x``.
    ``build=False``: only where they are already :func:`built` (a compile-time search
    that runs eager too should not start the one-minute build).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or step.dtype != torch.float32:
        return None
    if not build and not built():
        return None
    if per_row:
        if step.dim() != 1 or x.dim() == 0 or step.numel() not in (1, x.shape[0]):
            return None
    elif step.dim() > x.dim() or (step.numel() != 1 and not _one_per_row(x, step)):
        return None
    if capturing():
        return None
    return fused()



# Shapes the probe compares on: (N, C) as BatchNorm1d gets it, (N, C, L), maps whose
# plane is and is not a multiple of the vector width, a 1x1 plane (contiguous in both
# memory formats), a volume.
_PROBE_SHAPES = ((5, 6), (3, 5, 37), (4, 8, 5, 7), (2, 16, 16, 16), (4, 8, 1, 1), (2, 4, 3, 5, 6))


def _probe_batch_norm_form(kernel: ModuleType) -> bool | None:
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in _PROBE_SHAPES:
        x = torch.randn(shape, generator=g) * 3 + 1
        w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
        for weight, bias in ((w, b), (None, None)):
            out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5)
            cases.append((out, (x, mean, invstd, weight, bias)))
    for fused_multiply_add in (True, False):
        if all(torch.equal(kernel.batch_norm_output(*args, fused_multiply_add), out) for out, args in cases):
            return fused_multiply_add
    return None


def batch_norm_form() -> bool | None:
    """How to remake a training batch norm's output from its saved statistics with the same bits as ATen.

    ``True``: ATen's CPU kernel here fuses its multiply-adds (AVX2 and AVX-512 builds);
    ``False``: it does not; ``None``: the kernels are off or neither form reproduces
    ATen's output (then the batch norm runs again instead). Probed once per process
    on float32 tensors of several shapes; the kernel is ``batch_norm_output``.
    """
    if not enabled():
        return None
    if "batch_norm_form" not in _state:
        kernel = fused()
        _state["batch_norm_form"] = None if kernel is None else _probe_batch_norm_form(kernel)
    return _state["batch_norm_form"]


__all__ = ["batch_norm_form", "built", "disabled", "enabled", "fused", "usable"]
