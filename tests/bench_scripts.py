"""The bench/ scripts as modules, for their smoke tests (imported as a top-level module, like small_models)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(script: str) -> ModuleType:
    """``bench/<script>.py`` imported as ``bench_<script>`` (registered, since dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH_DIR / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
