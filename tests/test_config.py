"""Typed configs: one reading of values from Python, YAML, JSON metadata and flags."""

from dataclasses import dataclass
from typing import Literal

import pytest

from xception.config import check_known, coerce, from_values, normalize


@dataclass(frozen=True)
class Example:
    layers: tuple[int, ...] = ()
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    groups: int | None = None
    stride: Literal[8, 16, 32] = 32
    act: Literal["none", "relu"] = "none"
    flag: bool = False
    rate: float = 0.1
    name: str | None = None

    def __post_init__(self) -> None:
        normalize(self)


@pytest.mark.parametrize(
    ("field", "given", "expected"),
    [
        ("layers", [64, 64], (64, 64)),  # YAML and JSON write tuples as lists
        ("layers", "64,64", (64, 64)),  # command-line text
        ("layers", "(4096, 4096)", (4096, 4096)),
        ("layers", "", ()),
        ("mean", [0.485, 0.456, 0.406], (0.485, 0.456, 0.406)),
        ("groups", "None", None),
        ("groups", "8", 8),
        ("groups", 8.0, 8),  # JSON may write an int as a float
        ("stride", "16", 16),
        ("stride", 16.0, 16),  # JSON's float for a Literal of ints
        ("act", "relu", "relu"),
        ("flag", "False", False),
        ("flag", "true", True),
        ("rate", "4e-5", 4e-5),  # YAML 1.1 reads 4e-5 as a string
        ("rate", 1, 1),
        ("name", "none", "none"),  # a string field keeps its text
    ],
)
def test_values_from_any_source_become_the_annotated_type(field, given, expected):
    value = getattr(Example(**{field: given}), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("field", "given", "message"),
    [
        ("layers", 4096, r"Example.layers=4096 is not tuple\[int, ...\]"),
        ("layers", "64,x", r"Example.layers=\(64, 'x'\)"),
        ("mean", (0.5, 0.5), r"Example.mean=\(0.5, 0.5\) is not tuple\[float, float, float\]"),
        ("stride", 12, r"Example.stride=12 is not one of 8, 16, 32"),
        ("act", "tanh", r"Example.act='tanh' is not one of 'none', 'relu'"),
        ("flag", "maybe", r"Example.flag='maybe' is not bool"),
        ("flag", 1, r"Example.flag=1 is not bool"),
        ("groups", True, r"Example.groups=True is not int \| None"),
        ("rate", "fast", r"Example.rate='fast' is not float"),
        ("rate", float("nan"), r"Example.rate=nan must be finite"),
        ("mean", "0.5,inf,0.5", r"Example.mean=\(0.5, inf, 0.5\) must be finite"),
    ],
)
def test_invalid_values_fail_naming_the_field_the_value_and_the_type(field, given, message):
    with pytest.raises(ValueError, match=message):
        Example(**{field: given})


def test_coerce_leaves_what_it_cannot_read_to_the_check():
    assert coerce(int, "eight") == "eight"
    assert coerce(tuple[int, ...], {"a": 1}) == {"a": 1}


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown example option 'layer'; valid: act, flag"):
        from_values(Example, {"layer": [1]}, "example option")
    check_known(Example, {"layers": 1}, "example option")
    assert from_values(Example, {"layers": [1, 2]}, "example option").layers == (1, 2)
