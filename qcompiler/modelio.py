"""Loading and saving float models, safely by default.

``torch.load`` on a pickled module runs code from the file, so we never do it
unless the user opts in. The safe formats load with ``weights_only=True``:

* a **checkpoint** written by :func:`save_checkpoint`: the architecture as
  ``"package.module:factory"`` plus its keyword arguments and the state dict;
* a bare **state dict**, with the architecture given separately (``--arch``).

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

from .errors import ModelLoadError

CHECKPOINT_FORMAT = "qcompiler-checkpoint-1"


def save_checkpoint(model: nn.Module, path: str | Path, arch: str, arch_kwargs: dict[str, Any] | None = None) -> None:
    """Save ``model`` so that :func:`load_model` can rebuild it without unpickling code."""
    torch.save(
        {"format": CHECKPOINT_FORMAT, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "state_dict": model.state_dict()},
        path,
    )


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
    if not p.is_file():
        raise ModelLoadError(f"model file {str(p)!r} does not exist; give the path of a saved model")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise ModelLoadError(
                f"{str(p)!r} is a pickled module and unpickling runs code from the file; pass --allow-pickle "
                "if you trust it, or save a state_dict and give --arch package.module:factory"
            ) from None
        return _load_pickle(p)
    except Exception as e:  # torch.load raises many kinds for a file that is not its own
        raise ModelLoadError(
            f"{str(p)!r} is not a PyTorch model file ({type(e).__name__}); save it with torch.save or "
            "qcompiler.modelio.save_checkpoint"
        ) from None

    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        model = build_arch(arch or obj["arch"], {**obj["arch_kwargs"], **(arch_kwargs or {})})
        return _load_state(model, obj["state_dict"], p)
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


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], p: Path) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelLoadError(f"the weights in {str(p)!r} do not fit the architecture ({first}); check --arch and its arguments") from None
    return model


def _load_pickle(p: Path) -> nn.Module:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"{str(p)!r} cannot be unpickled ({type(e).__name__}: {e}); is its class importable?") from None
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{str(p)!r} holds a {type(obj).__name__}, not an nn.Module")
    return obj
