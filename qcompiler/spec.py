"""QuantSpec: what the user asks the compiler for.

A spec names the bit widths, the pass pipeline, first/last-layer pinning and
per-layer overrides. It is plain data, validated on construction, and can be read
from JSON or TOML so experiments are reproducible from a file.

Example:
    >>> spec = QuantSpec(weight_bits=4, act_bits=4, passes=("asq", "post"))
    >>> spec.layer_bits("layer1.0.conv1", pinned_bits=None)
    (4, 4)
    >>> spec = QuantSpec(overrides=(LayerOverride("fc*", weight_bits=8),))
    >>> spec.layer_bits("fc", pinned_bits=None)
    (8, 4)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpecError

MIN_BITS, MAX_BITS = 2, 16

# How quantizer steps start (QuantSpec.init); qcompiler.quantizers.init implements each.
INITS = ("mse", "percentile", "lsq", "max")


def check_bits(bits: object, what: str) -> int:
    """Validate a bit width; the one place that says which widths we support.

    >>> check_bits(4, "--bits")
    4
    >>> check_bits(1, "--bits")
    Traceback (most recent call last):
    ...
    qcompiler.errors.SpecError: --bits must be an integer from 2 to 16, got 1; pick e.g. 4 or 8
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise SpecError(
            f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}; pick e.g. 4 or 8"
        )
    return bits


@dataclass(frozen=True)
class LayerOverride:
    """Bit widths for the layers whose node name matches ``pattern`` (a glob)."""

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None

    def matches(self, node_name: str, module_path: str = "") -> bool:
        return fnmatch.fnmatchcase(node_name, self.pattern) or bool(module_path) and fnmatch.fnmatchcase(module_path, self.pattern)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise SpecError("a layer override needs a non-empty 'pattern' (a node name or glob)")
        if self.weight_bits is not None:
            check_bits(self.weight_bits, f"override {self.pattern!r} weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, f"override {self.pattern!r} act_bits")


@dataclass(frozen=True)
class QuantSpec:
    """Everything the compiler needs to know about the quantization wanted.

    Attributes:
        weight_bits, act_bits: default bit widths of weights and activations.
        passes: the pipeline, as pass names (``"asq,post"`` is accepted too).
        pin_first_last: keep the layer reading the input and the one producing
            the output at ``pin_bits`` (the common practice in both papers).
        overrides: per-layer bit widths by node name or glob; the last match wins,
            and pinning wins over overrides.
        seed: seeds every random choice (k-means restarts, data order).
        calib_batches: how many calibration batches calibration passes read.
        outlier_alpha: quantile of ``|x|`` the outlier clamp keeps (AdderNet).
        adder_groups: number of group scales per adder layer.
        adder_weight_clamp: apply AdderNet's lossless weight clamp (ablations turn it off).
        adder_multiply_bits: width of an adder network's multiply layers (stem, 1x1
            shortcuts, classifier) that no other pass quantizes; ``None`` keeps them
            in float, as the AdderNet papers' tables do (recorded as float regions).
        quantize_joins: put residual adds and concats on integer grids (the
            ``quantize-joins`` pass, added whenever activations are quantized).
        quantize_matmuls: put both operands of every product of two activations
            (attention's ``q @ k^T``, ``attn @ v``) on grids (the ``quantize-matmuls``
            pass, added whenever activations are quantized); off keeps them float.
        bias_correction: after every quantizer is in place, shift each quantized
            layer's bias (or its batch norm's running mean) so its output mean per
            channel matches float on the calibration data (the ``bias-correction``
            pass, added whenever weights are quantized and calibration data is given).
        residual_bits: width of the residual stream: the quantizers on join
            operands and results (8, the common choice).
        asymmetric_acts: let an activation with negative values take an asymmetric
            grid, a zero point of a few codes below zero and the rest above, where that
            has the lower expected error on the calibration histogram (the thin
            negative tails of hardswish, SiLU and GELU outputs); off, each gets the
            signed or the unsigned grid. Hardware stores such codes as unsigned
            ``code + zero_point`` and folds the zero point into the next layer's bias.
        per_channel_joins: a residual add's operand that is a batch norm's output read
            by nothing else gets one step per channel instead of one for the tensor
            (its code range stays one): the channels of such a tensor differ in range by
            the norm's gains, and the join's requantization multipliers carry a scale per
            channel at no cost in integer hardware (off by default).
        leaf_modules: ``"package.module:Class"`` names the tracer keeps opaque.
        init: where the uniform steps and POT/POST clips of ``lsq`` / ``asq`` / ``pot``
            / ``post`` start (:mod:`qcompiler.quantizers.init`): ``"mse"`` (default) the
            clip with the least squared error on the calibration histogram (activations)
            or the weight itself (per output channel); ``"percentile"`` the 99.99th
            percentile of ``|x|``; ``"lsq"`` LSQ's ``2 mean|x| / sqrt(p)`` (POT/POST: a
            0.99 quantile of ``|W|``), a QAT start; ``"max"`` no clipping. Joins and the
            adder pipelines' multiply layers always start from ``"max"``.
    """

    weight_bits: int = 4
    act_bits: int = 4
    passes: tuple[str, ...] = ("lsq",)
    pin_first_last: bool = True
    pin_bits: int = 8
    overrides: tuple[LayerOverride, ...] = ()
    seed: int = 0
    calib_batches: int = 8
    outlier_alpha: float = 0.9992
    adder_groups: int = 4
    adder_weight_clamp: bool = True
    adder_multiply_bits: int | None = 8
    quantize_joins: bool = True
    quantize_matmuls: bool = True
    bias_correction: bool = True
    residual_bits: int = 8
    asymmetric_acts: bool = False
    per_channel_joins: bool = False
    leaf_modules: tuple[str, ...] = ()
    init: str = "mse"

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        check_bits(self.pin_bits, "pin_bits")
        check_bits(self.residual_bits, "residual_bits")
        if self.adder_multiply_bits is not None:
            check_bits(self.adder_multiply_bits, "adder_multiply_bits")
        if isinstance(self.passes, str):
            object.__setattr__(self, "passes", parse_pass_names(self.passes))
        else:
            object.__setattr__(self, "passes", _names(self.passes, "passes", 'e.g. ["asq", "post"] or "asq,post"'))
        if not self.passes:
            raise SpecError("the pass list is empty; give e.g. --passes lsq")
        for flag in ("pin_first_last", "adder_weight_clamp", "quantize_joins", "quantize_matmuls", "bias_correction",
                     "asymmetric_acts", "per_channel_joins"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if not self.pin_first_last and "pin-first-last" in self.passes:
            raise SpecError("the passes list 'pin-first-last' but pinning is off (--no-pin, pin_first_last=false); keep one of them")
        if self.overrides is None or isinstance(self.overrides, (str, bytes, dict)) or not _iterable(self.overrides):
            raise SpecError(f"overrides must be a list of {{pattern, weight_bits, act_bits}} tables, got {self.overrides!r}")
        overrides = tuple(
            o if isinstance(o, LayerOverride) else LayerOverride(**_known(o, LayerOverride, "override"))
            for o in self.overrides
        )
        object.__setattr__(self, "overrides", overrides)
        object.__setattr__(self, "leaf_modules", _names(self.leaf_modules, "leaf_modules", 'e.g. ["mypkg.layers:Gate"]'))
        if not _is_int(self.seed) or self.seed < 0:
            raise SpecError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.calib_batches) or self.calib_batches < 1:
            raise SpecError(f"calib_batches must be a positive integer, got {self.calib_batches!r}")
        if isinstance(self.outlier_alpha, bool) or not isinstance(self.outlier_alpha, (int, float)) \
                or not 0.5 < float(self.outlier_alpha) <= 1.0:
            raise SpecError(f"outlier_alpha must be a number in (0.5, 1], got {self.outlier_alpha!r}; the paper uses 0.999")
        if not _is_int(self.adder_groups) or self.adder_groups < 1:
            raise SpecError(f"adder_groups must be a positive integer, got {self.adder_groups!r}")
        if self.init not in INITS:
            raise SpecError(f"init must be one of {', '.join(INITS)}, got {self.init!r}; \"mse\" suits PTQ, \"lsq\" is LSQ's QAT start")

    def layer_bits(self, layer: str, pinned_bits: int | None, module_path: str = "") -> tuple[int, int]:
        """(weight bits, input-activation bits) of the layer with node name ``layer``.

        Override patterns match the node name (``stages_8_conv1``) or the module path
        (``stages.8.conv1``).
        """
        if pinned_bits is not None:
            return pinned_bits, pinned_bits
        w, a = self.weight_bits, self.act_bits
        for o in self.overrides:
            if o.matches(layer, module_path):
                w = o.weight_bits if o.weight_bits is not None else w
                a = o.act_bits if o.act_bits is not None else a
        return w, a

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passes"] = list(self.passes)
        d["overrides"] = [dataclasses.asdict(o) for o in self.overrides]
        d["leaf_modules"] = list(self.leaf_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Build a spec from plain data; unknown keys are an error, not ignored."""
        return cls(**_known(data, cls, "spec"))

    @classmethod
    def load(cls, path: str | Path) -> QuantSpec:
        """Read a spec from a ``.json`` or ``.toml`` file.

        TOML example::

            weight_bits = 4
            act_bits = 4
            passes = ["asq", "post"]
            [[overrides]]
            pattern = "stages.8.*"
            act_bits = 8
        """
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"spec file {str(p)!r} does not exist; give a .json or .toml file")
        try:
            if p.suffix == ".toml":
                data = tomllib.loads(p.read_text())
            elif p.suffix == ".json":
                data = json.loads(p.read_text())
            else:
                raise SpecError(f"spec file {str(p)!r} must end in .json or .toml")
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SpecError(f"spec file {str(p)!r} is not valid {p.suffix[1:].upper()}: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"spec file {str(p)!r} must hold a table/object at top level")
        return cls.from_dict(data)


def parse_pass_names(text: str) -> tuple[str, ...]:
    """Split ``"asq, post"`` into ``("asq", "post")``.

    >>> parse_pass_names("asq, post")
    ('asq', 'post')
    """
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        raise SpecError("the pass list is empty; give e.g. --passes lsq")
    return names


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _iterable(v: object) -> bool:
    try:
        iter(v)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def _names(value: object, what: str, example: str) -> tuple[str, ...]:
    """A list of non-empty strings (a bare string is one name's letters, never what was meant)."""
    if value is None or isinstance(value, (str, bytes, dict)) or not _iterable(value):
        raise SpecError(f"{what} must be a list of names, {example}; got {value!r}")
    names = tuple(value)  # type: ignore[arg-type]
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise SpecError(f"{what} must hold non-empty names, {example}; got {bad[0]!r}")
    return names


def _known(data: Any, cls: type, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(f"{what} must be a table/object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"unknown {what} key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    return dict(data)


__all__ = ["QuantSpec", "LayerOverride", "check_bits", "parse_pass_names"]
