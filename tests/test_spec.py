"""Tests for qcompiler.spec: validation, pass strings, overrides, JSON/TOML files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qcompiler.errors import SpecError
from qcompiler.spec import LayerOverride, QuantSpec, check_bits, parse_pass_names

BAD_BITS: list[object] = [0, 1, 17, 33, -4, True, False, "4", 4.0, None]


# --------------------------------------------------------------------------- bit widths


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "pin_bits"])
def test_bad_bits_rejected(field: str, bits: object) -> None:
    with pytest.raises(SpecError) as info:
        QuantSpec(**{field: bits})
    message = str(info.value)
    assert "\n" not in message
    assert field in message and repr(bits) in message


@pytest.mark.parametrize("bits", range(2, 17))
def test_bits_2_to_16_accepted(bits: int) -> None:
    spec = QuantSpec(weight_bits=bits, act_bits=bits, pin_bits=bits)
    assert (spec.weight_bits, spec.act_bits, spec.pin_bits) == (bits, bits, bits)
    assert check_bits(bits, "--bits") == bits


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
def test_check_bits_names_the_flag(bits: object) -> None:
    with pytest.raises(SpecError, match="^--weight-bits must be an integer from 2 to 16"):
        check_bits(bits, "--weight-bits")


@pytest.mark.parametrize("bits", [1, 17, True, "8"], ids=repr)
def test_override_bits_validated(bits: object) -> None:
    with pytest.raises(SpecError, match="fc"):
        LayerOverride("fc", weight_bits=bits)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="fc"):
        LayerOverride("fc", act_bits=bits)  # type: ignore[arg-type]


def test_override_needs_pattern() -> None:
    with pytest.raises(SpecError, match="pattern"):
        LayerOverride("")


def test_replace_validates() -> None:
    spec = QuantSpec()
    assert spec.replace(weight_bits=3).weight_bits == 3
    with pytest.raises(SpecError):
        spec.replace(act_bits=1)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"calib_batches": 0}, "calib_batches"),
        ({"calib_batches": 2.5}, "calib_batches"),
        ({"outlier_alpha": 0.4}, "outlier_alpha"),
        ({"outlier_alpha": 1.01}, "outlier_alpha"),
        ({"adder_groups": 0}, "adder_groups"),
        ({"init": "minmax"}, "init must be one of mse, percentile, lsq, max"),
        ({"init": None}, "init"),
    ],
)
def test_other_fields_validated(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        QuantSpec(**changes)


def test_init_defaults_to_mse_and_takes_each_documented_value() -> None:
    assert QuantSpec().init == "mse"
    for init in ("mse", "percentile", "lsq", "max"):
        assert QuantSpec.from_dict({"init": init}).init == init


# --------------------------------------------------------------------------- pass strings


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lsq", ("lsq",)),
        ("asq,post", ("asq", "post")),
        (" asq , post ", ("asq", "post")),
        ("asq,,post,", ("asq", "post")),
    ],
)
def test_parse_pass_names(text: str, expected: tuple[str, ...]) -> None:
    assert parse_pass_names(text) == expected
    assert QuantSpec(passes=text).passes == expected


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_empty_pass_string_rejected(text: str) -> None:
    with pytest.raises(SpecError, match="empty"):
        parse_pass_names(text)
    with pytest.raises(SpecError, match="empty"):
        QuantSpec(passes=text)


def test_pass_list_becomes_tuple() -> None:
    spec = QuantSpec(passes=["observe", "lsq"])  # type: ignore[arg-type]
    assert spec.passes == ("observe", "lsq")
    assert hash(spec)  # frozen and hashable: every container field is a tuple


def test_empty_pass_tuple_rejected() -> None:
    with pytest.raises(SpecError, match="empty"):
        QuantSpec(passes=())


# --------------------------------------------------------------------------- overrides


def test_override_glob_last_match_wins() -> None:
    spec = QuantSpec(
        weight_bits=4,
        act_bits=4,
        overrides=(
            LayerOverride("stages_*", weight_bits=6),
            LayerOverride("stages_8_*", weight_bits=8, act_bits=8),
            LayerOverride("stages_8_conv2", act_bits=3),
        ),
    )
    assert spec.layer_bits("stem_0", pinned_bits=None) == (4, 4)
    assert spec.layer_bits("stages_0_conv1", pinned_bits=None) == (6, 4)
    assert spec.layer_bits("stages_8_conv1", pinned_bits=None) == (8, 8)
    # Only act_bits set by the last match: weight_bits of the earlier match stays.
    assert spec.layer_bits("stages_8_conv2", pinned_bits=None) == (8, 3)


def test_override_order_matters() -> None:
    first = LayerOverride("fc", weight_bits=8)
    second = LayerOverride("f*", weight_bits=2)
    assert QuantSpec(overrides=(first, second)).layer_bits("fc", None) == (2, 4)
    assert QuantSpec(overrides=(second, first)).layer_bits("fc", None) == (8, 4)


def test_override_glob_is_case_sensitive_and_whole_name() -> None:
    spec = QuantSpec(overrides=(LayerOverride("conv?", weight_bits=8),))
    assert spec.layer_bits("conv1", None) == (8, 4)
    assert spec.layer_bits("conv12", None) == (4, 4)
    assert spec.layer_bits("Conv1", None) == (4, 4)
    assert spec.layer_bits("x_conv1", None) == (4, 4)


def test_pinning_wins_over_overrides() -> None:
    spec = QuantSpec(overrides=(LayerOverride("*", weight_bits=2, act_bits=3),))
    assert spec.layer_bits("fc", pinned_bits=8) == (8, 8)
    assert spec.layer_bits("conv", pinned_bits=None) == (2, 3)


def test_overrides_from_dicts() -> None:
    spec = QuantSpec(overrides=({"pattern": "fc", "act_bits": 8},))  # type: ignore[arg-type]
    assert spec.overrides == (LayerOverride("fc", act_bits=8),)
    with pytest.raises(SpecError, match="bits_w"):
        QuantSpec(overrides=({"pattern": "fc", "bits_w": 8},))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="override must be a table"):
        QuantSpec(overrides=("fc",))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- files


def _rich_spec() -> QuantSpec:
    return QuantSpec(
        weight_bits=3,
        act_bits=5,
        passes=("observe", "lsq"),
        pin_first_last=False,
        pin_bits=6,
        overrides=(LayerOverride("stages_8_*", act_bits=8), LayerOverride("fc", weight_bits=7, act_bits=2)),
        seed=7,
        calib_batches=3,
        outlier_alpha=0.999,
        adder_groups=2,
        leaf_modules=("untraceable_helpers:Gate",),
    )


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _to_toml(d: dict[str, Any]) -> str:
    """A tiny TOML writer for spec dicts (tomllib only reads)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if k != "overrides"]
    for o in d["overrides"]:
        lines.append("[[overrides]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in o.items() if v is not None]
    return "\n".join(lines) + "\n"


def test_to_dict_is_plain_data() -> None:
    d = _rich_spec().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["passes"] == ["observe", "lsq"]
    assert d["overrides"][0] == {"pattern": "stages_8_*", "weight_bits": None, "act_bits": 8}
    assert QuantSpec.from_dict(d) == _rich_spec()


def test_json_round_trip(tmp_path: Path) -> None:
    spec = _rich_spec()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict(), indent=2))
    loaded = QuantSpec.load(path)
    assert loaded == spec
    assert QuantSpec.load(str(path)) == spec


def test_toml_round_trip(tmp_path: Path) -> None:
    spec = _rich_spec()
    path = tmp_path / "spec.toml"
    path.write_text(_to_toml(spec.to_dict()))
    assert QuantSpec.load(path) == spec


def test_default_spec_round_trips(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(QuantSpec().to_dict()))
    (tmp_path / "d.toml").write_text(_to_toml(QuantSpec().to_dict()))
    assert QuantSpec.load(tmp_path / "d.json") == QuantSpec()
    assert QuantSpec.load(tmp_path / "d.toml") == QuantSpec()


def test_readme_toml_example(tmp_path: Path) -> None:
    path = tmp_path / "readme.toml"
    path.write_text(
        'weight_bits = 4\nact_bits = 4\npasses = ["lsq"]\npin_first_last = true\nseed = 0\n'
        '[[overrides]]\npattern = "stages_8_*"\nact_bits = 8\n'
    )
    spec = QuantSpec.load(path)
    assert spec.layer_bits("stages_8_conv1", None) == (4, 8)
    assert spec.layer_bits("stages_7_conv1", None) == (4, 4)


def test_partial_file_keeps_defaults(tmp_path: Path) -> None:
    path = tmp_path / "partial.toml"
    path.write_text('passes = "observe, lsq"\nweight_bits = 2\n')
    assert QuantSpec.load(path) == QuantSpec(weight_bits=2, passes=("observe", "lsq"))


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_unknown_key_rejected(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"spec{suffix}"
    path.write_text('{"weight_bits": 4, "wieght_bits": 3}' if suffix == ".json" else "weight_bits = 4\nwieght_bits = 3\n")
    with pytest.raises(SpecError) as info:
        QuantSpec.load(path)
    message = str(info.value)
    assert "wieght_bits" in message and "weight_bits" in message and "\n" not in message


def test_unknown_override_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text('[[overrides]]\npattern = "fc"\nbits = 8\n')
    with pytest.raises(SpecError, match="unknown override key"):
        QuantSpec.load(path)


def test_bad_values_in_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"weight_bits": 1}')
    with pytest.raises(SpecError, match="weight_bits"):
        QuantSpec.load(path)
    path.write_text('{"act_bits": "4"}')
    with pytest.raises(SpecError, match="act_bits"):
        QuantSpec.load(path)


@pytest.mark.parametrize("name", ["spec.yaml", "spec.txt", "spec", "spec.json.bak"])
def test_bad_suffix_rejected(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text('{"weight_bits": 4}')
    with pytest.raises(SpecError, match=r"\.json or \.toml"):
        QuantSpec.load(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        QuantSpec.load(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="does not exist"):
        QuantSpec.load(tmp_path)  # a folder is not a spec file


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("bad.toml", "weight_bits = = 4\n", "not valid TOML"),
        ("bad.toml", "[[overrides]\n", "not valid TOML"),
        ("bad.json", '{"weight_bits": 4,', "not valid JSON"),
        ("bad.json", "", "not valid JSON"),
    ],
)
def test_invalid_file_content(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        QuantSpec.load(path)
    message = str(info.value)
    assert fragment in message and name in message
    assert "\n" not in message


def test_invalid_utf8_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"weight_bits = 4\n\xff\xfe\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        QuantSpec.load(path)


@pytest.mark.parametrize("text", ["[1, 2]", '"lsq"', "4"])
def test_json_top_level_must_be_object(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.json"
    path.write_text(text)
    with pytest.raises(SpecError, match="top level"):
        QuantSpec.load(path)


def test_pin_first_last_must_be_bool(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"pin_first_last": "false"}')
    with pytest.raises(SpecError, match="pin_first_last"):
        QuantSpec.load(path)


def test_override_by_module_path_applies() -> None:
    import torch

    import qcompiler
    from qcompiler.zoo import resnet20

    spec = QuantSpec(passes="lsq", overrides=(LayerOverride("stages.8.*", act_bits=8),))
    compiled = qcompiler.compile(resnet20(in_channels=1, width=4), spec, calib_data=torch.randn(8, 1, 8, 8))
    bits = {r.name: r.act_bits for r in compiled.report.layers}
    assert bits["stages_8_conv1"] == 8 and bits["stages_8_conv2"] == 8
    assert bits["stages_7_conv1"] == 4  # and nothing else
