"""Loading and saving float models, safely by default.

``torch.load`` on a pickled module runs code from the file, so we never do it
unless the user opts in. The safe formats load with ``weights_only=True``:

* a **checkpoint** written by :func:`save_checkpoint`: the architecture as
  ``"package.module:factory"`` plus its keyword arguments and the state dict;
* a bare **state dict**, with the architecture given separately (``--arch``).

A checkpoint's architecture name is data from the file, and calling it would run
whatever function the file names (``os:system`` is a valid ``module:factory``). So
only factories of :mod:`qcompiler.zoo` are called on the file's word; any other
must be named by the user (``--arch``, or ``arch=`` in the API).

Example:
    >>> import tempfile, os
    >>> from qcompiler.zoo import plain_cnn
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> save_checkpoint(plain_cnn(), path, "qcompiler.zoo:plain_cnn", {"width": 16})
    >>> type(load_model(path)).__name__
    'PlainCNN'
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import staged_file
from .errors import ModelLoadError

CHECKPOINT_FORMAT = "qcompiler-checkpoint-1"
ZOO_MODULE = "qcompiler.zoo"


def save_checkpoint(model: nn.Module, path: str | Path, arch: str, arch_kwargs: dict[str, Any] | None = None) -> None:
    """Save ``model`` so that :func:`load_model` can rebuild it without unpickling code (atomically:
    a crash or a full disk leaves the old file, never half of a new one)."""
    with staged_file(path) as f:
        torch.save({"format": CHECKPOINT_FORMAT, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}),
                    "state_dict": model.state_dict()}, f)


def build_arch(arch: str, arch_kwargs: dict[str, Any]) -> nn.Module:
    """Call the factory named ``"package.module:factory"``."""
    mod_name, sep, fn_name = arch.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ModelLoadError(f"--arch {arch!r} must look like package.module:factory, e.g. qcompiler.zoo:resnet20")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"--arch {arch!r} cannot be imported ({e}); check the module path and factory name") from None
    try:
        model = factory(**arch_kwargs)
    except TypeError as e:
        raise ModelLoadError(f"--arch {arch!r} rejected its arguments {arch_kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_model(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load a float model from a checkpoint, a state dict (+ ``arch``) or, if allowed, a pickle."""
    p = Path(path)
    if p.is_dir():
        raise ModelLoadError(f"model path {str(p)!r} is a directory; give the model file inside it (e.g. model.pt)")
    if not p.is_file():
        raise ModelLoadError(f"model file {str(p)!r} does not exist; give the path of a saved model")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _is_code_pickle(e):
            raise ModelLoadError(f"{str(p)!r} is truncated or corrupt ({_first_line(e)}); save the model again") from None
        if not allow_pickle:
            raise ModelLoadError(
                f"{str(p)!r} is a pickled module and unpickling runs code from the file; pass --allow-pickle "
                "if you trust it, or save a state_dict and give --arch package.module:factory"
            ) from None
        return _load_pickle(p)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = _first_line(e).split(". ")[0]
        if _looks_like_torch_file(p) or isinstance(e, EOFError):
            raise ModelLoadError(f"{str(p)!r} is truncated or corrupt ({reason}); save the model again") from None
        raise ModelLoadError(
            f"{str(p)!r} is not a PyTorch model file ({type(e).__name__}: {reason}); save it with torch.save or "
            "qcompiler.modelio.save_checkpoint"
        ) from None
    except Exception as e:  # torch.load raises many kinds for a file that is not its own
        raise ModelLoadError(
            f"{str(p)!r} is not a PyTorch model file ({type(e).__name__}); save it with torch.save or "
            "qcompiler.modelio.save_checkpoint"
        ) from None

    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state, file_arch, file_kwargs = obj.get("state_dict"), obj.get("arch"), obj.get("arch_kwargs", {})
        if not isinstance(state, dict) or not isinstance(file_arch, str) or not isinstance(file_kwargs, dict):
            raise ModelLoadError(f"{str(p)!r} is a damaged qcompiler checkpoint (arch, arch_kwargs or state_dict); save it again")
        if arch is None:
            check_file_arch(file_arch, p)
        model = build_arch(arch or file_arch, {**file_kwargs, **(arch_kwargs or {})})
        return _load_state(model, state, p)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise ModelLoadError(
                f"{str(p)!r} holds a state_dict, which has no architecture; give --arch package.module:factory "
                "(e.g. qcompiler.zoo:resnet20)"
            )
        return _load_state(build_arch(arch, arch_kwargs or {}), obj, p)
    raise ModelLoadError(
        f"{str(p)!r} holds a {type(obj).__name__}, not a model; give a state_dict with --arch, a "
        "qcompiler checkpoint, or a pickled module with --allow-pickle"
    )


def check_file_arch(arch: str, p: Path) -> None:
    """Refuse to call a factory that only the file names, unless it is one of the zoo's."""
    from .zoo import ZOO

    mod_name, _, fn_name = arch.partition(":")
    if mod_name == ZOO_MODULE and fn_name in ZOO:
        return
    raise ModelLoadError(
        f"{str(p)!r} names its architecture {arch!r}, which is not a qcompiler.zoo model, and calling it would run "
        f"code the file chose; if you trust it, name it yourself with --arch {arch}"
    )


def _is_code_pickle(e: Exception) -> bool:
    """``weights_only`` refused a global (a class or function): the file is a pickled object, not damaged."""
    text = str(e)
    return "Unsupported global" in text or "GLOBAL" in text or "weights_only" in text.split("\n")[0]


def _looks_like_torch_file(p: Path) -> bool:
    """torch.save writes a zip archive (or, in the legacy format, a pickle protocol 2 header)."""
    with p.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], p: Path) -> nn.Module:
    expected = model.state_dict()
    problem = _first_mismatch(expected, state)
    if problem:
        raise ModelLoadError(f"the weights in {str(p)!r} do not fit the architecture ({problem}); check --arch and its arguments")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(
            f"the weights in {str(p)!r} do not fit the architecture ({_first_line(e)}); check --arch and its arguments"
        ) from None
    check_finite(model, p)
    return model


def _first_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """The first missing, unexpected or mis-shaped key, in the model's own order."""
    for k, v in expected.items():
        if k not in state:
            return f"missing key {k!r}"
        if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape):
            return f"{k!r} has shape {tuple(state[k].shape)} in the file, the model expects {tuple(v.shape)}"
    for k in state:
        if k not in expected:
            return f"unexpected key {k!r}"
    return None


def non_finite(module: nn.Module) -> tuple[str, int] | None:
    """The first floating parameter or buffer holding NaN or Inf, and how many such values it holds."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum())
    return None


def check_finite(model: nn.Module, where: Path | str) -> None:
    """Name the first parameter or buffer holding NaN or Inf: every pass after this would fail obscurely."""
    found = non_finite(model)
    if found:
        name, bad = found
        raise ModelLoadError(
            f"{name!r} in {where if isinstance(where, str) else repr(str(where))} holds {bad} NaN or infinite "
            "value(s); retrain or repair the model before compiling"
        )


def _load_pickle(p: Path) -> nn.Module:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"{str(p)!r} cannot be unpickled ({type(e).__name__}: {e}); is its class importable?") from None
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{str(p)!r} holds a {type(obj).__name__}, not an nn.Module")
    check_finite(obj, p)
    return obj
